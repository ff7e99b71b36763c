//! A fixed-size bit set over the regions of one extent (the dirty bitmap).

/// Bit `i` is region `i` of an extent. At most [`crate::meta::REGIONS_PER_EXTENT_MAX`] bits,
/// so it always fits one PROMISE_ACK (512 bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: u32,
}

impl Bitmap {
    pub fn new(bits: u32) -> Self {
        Self { words: vec![0; bits.div_ceil(64) as usize], bits }
    }

    pub fn len(&self) -> u32 {
        self.bits
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.bits && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was clear. Out-of-range bits are ignored.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.bits {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let was_clear = *w & (1 << (i % 64)) == 0;
        *w |= 1 << (i % 64);
        was_clear
    }

    pub fn clear(&mut self, i: u32) {
        if i < self.bits {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    pub fn union_with(&mut self, other: &Bitmap) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= *o;
        }
    }

    pub fn count(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.bits).filter(|&i| self.get(i))
    }

    /// Little-endian bytes, `ceil(bits / 8)` of them (the wire and on-disk form).
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.bits.div_ceil(8) as usize;
        self.words.iter().flat_map(|w| w.to_le_bytes()).take(n).collect()
    }

    /// The inverse of [`Bitmap::to_bytes`]; bits past `bits` in the last byte must be zero.
    pub fn from_bytes(bits: u32, bytes: &[u8]) -> Option<Self> {
        if bytes.len() != bits.div_ceil(8) as usize {
            return None;
        }
        let mut map = Self::new(bits);
        for (i, b) in bytes.iter().enumerate() {
            map.words[i / 8] |= u64::from(*b) << ((i % 8) * 8);
        }
        let tail = bits % 64;
        if tail != 0 && map.words.last().is_some_and(|w| w >> tail != 0) {
            return None;
        }
        Some(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_union_and_bytes() {
        let mut a = Bitmap::new(70);
        assert!(a.set(0));
        assert!(!a.set(0));
        assert!(a.set(69));
        assert!(!a.set(70), "out of range is ignored");
        let mut b = Bitmap::new(70);
        b.set(5);
        a.union_with(&b);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![0, 5, 69]);
        a.clear(5);
        assert_eq!(a.count(), 2);
        let bytes = a.to_bytes();
        assert_eq!(bytes.len(), 9);
        assert_eq!(Bitmap::from_bytes(70, &bytes).unwrap(), a);
        assert!(Bitmap::from_bytes(70, &bytes[..8]).is_none());
        let mut junk = bytes;
        junk[8] |= 0x80;
        assert!(Bitmap::from_bytes(70, &junk).is_none(), "bits past the end must be zero");
    }
}
