//! Who may read what the daemon keeps on disk: only its own user. A volume's backing holds a
//! VM's whole disk, its metadata names paths and serials; a local user outside the daemon's
//! account has no business reading either.
//!
//! The daemon creates its directories [`DIR_MODE`] and its files [`FILE_MODE`], and at start
//! takes group and other access away from what earlier versions left in the data directory
//! (they created `0755` directories and `0644` files), saying in the log what it changed.
//! Sockets are not this module's: who may connect to a volume is configured on its export.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Directories the daemon creates: data dir, `volumes/`, `replicas/`.
pub const DIR_MODE: u32 = 0o700;
/// Files the daemon creates in them: backings, metadata records, replica state, the lock.
pub const FILE_MODE: u32 = 0o600;
/// The subdirectories of the data dir whose entries are the daemon's own files.
const SUBDIRS: [&str; 2] = ["volumes", "replicas"];

/// Creates `dir` and any missing parent with [`DIR_MODE`]; an existing one is left as it is
/// (see [`tighten_data_dir`]).
pub fn create_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// One change [`tighten_data_dir`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tightened {
    pub path: PathBuf,
    pub from_mode: u32,
    pub to_mode: u32,
}

/// Takes group and other access away from the data dir, its `volumes/` and `replicas/`
/// directories and the files directly in them (and the data dir's own files, such as its lock),
/// and logs each change. Symbolic links and sockets are left alone: a link's target is not the
/// daemon's to change, and sockets get their mode from their export.
pub fn tighten_data_dir(data_dir: &Path) -> io::Result<Vec<Tightened>> {
    let mut changed = Vec::new();
    tighten(data_dir, &mut changed)?;
    for entry in fs::read_dir(data_dir)? {
        let entry = entry?;
        let path = entry.path();
        let is_subdir = entry.file_type()?.is_dir() && SUBDIRS.iter().any(|s| entry.file_name() == *s);
        tighten(&path, &mut changed)?;
        if is_subdir {
            for inner in fs::read_dir(&path)? {
                tighten(&inner?.path(), &mut changed)?;
            }
        }
    }
    for t in &changed {
        tracing::warn!(
            path = %t.path.display(),
            from = format_args!("{:04o}", t.from_mode),
            to = format_args!("{:04o}", t.to_mode),
            "took group and other access away from a data file left by an earlier version"
        );
    }
    Ok(changed)
}

fn tighten(path: &Path, changed: &mut Vec<Tightened>) -> io::Result<()> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(m) => m,
        // Removed meanwhile (a temp file of a record being written): nothing to protect.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let kind = metadata.file_type();
    if !(kind.is_dir() || kind.is_file()) {
        return Ok(());
    }
    let from_mode = metadata.permissions().mode() & 0o7777;
    if from_mode & 0o077 == 0 {
        return Ok(());
    }
    let to_mode = from_mode & !0o077;
    fs::set_permissions(path, fs::Permissions::from_mode(to_mode))?;
    changed.push(Tightened { path: path.to_owned(), from_mode, to_mode });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn set_mode(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn created_directories_are_private() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b/volumes");
        create_dir(&dir).unwrap();
        for d in [root.path().join("a"), root.path().join("a/b"), dir] {
            assert_eq!(mode(&d), DIR_MODE, "{}", d.display());
        }
    }

    #[test]
    fn what_an_earlier_version_left_is_tightened_once() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        fs::create_dir_all(data.join("volumes")).unwrap();
        fs::create_dir_all(data.join("replicas")).unwrap();
        fs::create_dir_all(data.join("other/deeper")).unwrap();
        let img = data.join("volumes/vm.img");
        let json = data.join("volumes/vm.json");
        let state = data.join("replicas/0000000000000001.state");
        let lock = data.join("lock");
        let deeper = data.join("other/deeper/file");
        for f in [&img, &json, &state, &lock, &deeper] {
            fs::write(f, b"x").unwrap();
            set_mode(f, 0o644);
        }
        set_mode(&json, 0o600);
        for d in [&data, &data.join("volumes"), &data.join("replicas"), &data.join("other")] {
            set_mode(d, 0o755);
        }
        // A link to a file outside: neither it nor its target is the daemon's to change.
        let outside = root.path().join("outside.img");
        fs::write(&outside, b"y").unwrap();
        set_mode(&outside, 0o644);
        symlink(&outside, data.join("volumes/linked.img")).unwrap();

        let changed = tighten_data_dir(&data).unwrap();
        let mut paths: Vec<&Path> = changed.iter().map(|t| t.path.as_path()).collect();
        paths.sort();
        let mut expected = vec![data.as_path(), lock.as_path(), img.as_path(), state.as_path()];
        let (other, volumes, replicas) = (data.join("other"), data.join("volumes"), data.join("replicas"));
        expected.extend([other.as_path(), volumes.as_path(), replicas.as_path()]);
        expected.sort();
        assert_eq!(paths, expected);
        assert!(changed.iter().all(|t| t.to_mode == t.from_mode & 0o700));
        for f in [&img, &state, &lock] {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        for d in [&data, &volumes, &replicas, &other] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        // Only the daemon's own levels: a deeper file is not one it made.
        assert_eq!(mode(&deeper), 0o644);
        assert_eq!(mode(&outside), 0o644);
        assert_eq!(tighten_data_dir(&data).unwrap(), Vec::new(), "a second start changes nothing");
    }
}
