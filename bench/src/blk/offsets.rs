//! Byte offsets for the next request: uniformly random block-aligned, or sequential with
//! wrap-around, always inside `[0, span)`.

/// xorshift64* (Vigna): a few ns per draw and no dependency; statistical quality is ample
/// for picking disk blocks.
#[derive(Debug, Clone)]
struct XorShift64Star(u64);

impl XorShift64Star {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[derive(Debug, Clone)]
pub struct Offsets {
    bs_bytes: u64,
    blocks: u64,
    mode: Mode,
}

#[derive(Debug, Clone)]
enum Mode {
    Random(XorShift64Star),
    Sequential { next_block: u64 },
}

impl Offsets {
    /// `None` when `span_bytes` holds no whole block of `bs_bytes`.
    pub fn new(random: bool, bs_bytes: u64, span_bytes: u64, seed: u64) -> Option<Self> {
        if bs_bytes == 0 {
            return None;
        }
        let blocks = span_bytes / bs_bytes;
        if blocks == 0 {
            return None;
        }
        let mode = if random {
            // xorshift has the all-zero state as a fixed point.
            Mode::Random(XorShift64Star(seed | 1))
        } else {
            Mode::Sequential { next_block: 0 }
        };
        Some(Offsets { bs_bytes, blocks, mode })
    }

    pub fn next(&mut self) -> u64 {
        let block = match &mut self.mode {
            // The modulo bias is below blocks/2^64, far under measurement noise.
            Mode::Random(rng) => rng.next() % self.blocks,
            Mode::Sequential { next_block } => {
                let b = *next_block;
                *next_block = if b + 1 == self.blocks { 0 } else { b + 1 };
                b
            }
        };
        block * self.bs_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_offsets_are_aligned_in_range_and_spread() {
        let span = 1 << 30;
        let mut o = Offsets::new(true, 4096, span, 0).unwrap();
        let mut seen = std::collections::HashSet::new();
        let mut upper_half = 0;
        for _ in 0..10_000 {
            let off = o.next();
            assert_eq!(off % 4096, 0);
            assert!(off + 4096 <= span);
            seen.insert(off);
            if off >= span / 2 {
                upper_half += 1;
            }
        }
        // Birthday bound: 10^4 draws from 2^18 blocks repeat ~190 times (sd ~14).
        assert!(seen.len() > 9_700, "too many repeats: {}", seen.len());
        assert!((4_500..5_500).contains(&upper_half), "skewed: {upper_half}");
    }

    #[test]
    fn sequential_offsets_wrap_at_the_span() {
        let mut o = Offsets::new(false, 128 << 10, 3 * (128 << 10) + 100, 7).unwrap();
        let got: Vec<u64> = (0..5).map(|_| o.next()).collect();
        assert_eq!(got, vec![0, 131072, 262144, 0, 131072]);
    }

    #[test]
    fn a_span_smaller_than_a_block_is_refused() {
        assert!(Offsets::new(true, 4096, 4095, 1).is_none());
        assert!(Offsets::new(true, 0, 4096, 1).is_none());
    }
}
