//! The backing directory: a plain tree holding exactly the durable state (hard links kept).
//! Loaded at mount; rewritten from the model at a power cut.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::model::{Node, ROOT};

/// Reads `dir` into nodes numbered from [`ROOT`]; files that are hard links of each other
/// share one node.
pub fn load(dir: &Path) -> io::Result<HashMap<u64, Node>> {
    let mut nodes = HashMap::new();
    let mut by_inode: HashMap<(u64, u64), u64> = HashMap::new();
    let mut next = ROOT + 1;
    let mode = fs::metadata(dir)?.mode() & 0o7777;
    let entries = load_dir(dir, &mut nodes, &mut by_inode, &mut next)?;
    nodes.insert(ROOT, Node::Dir { entries, mode });
    Ok(nodes)
}

fn load_dir(
    dir: &Path,
    nodes: &mut HashMap<u64, Node>,
    by_inode: &mut HashMap<(u64, u64), u64>,
    next: &mut u64,
) -> io::Result<BTreeMap<std::ffi::OsString, u64>> {
    let mut entries = BTreeMap::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let md = fs::symlink_metadata(e.path())?;
        let mode = md.mode() & 0o7777;
        let key = (md.dev(), md.ino());
        if md.is_file()
            && let Some(ino) = by_inode.get(&key)
        {
            entries.insert(e.file_name(), *ino);
            continue;
        }
        let ino = *next;
        *next += 1;
        let node = if md.is_dir() {
            Node::Dir {
                entries: load_dir(&e.path(), nodes, by_inode, next)?,
                mode,
            }
        } else if md.is_file() {
            by_inode.insert(key, ino);
            Node::File {
                data: fs::read(e.path())?,
                mode,
            }
        } else {
            return Err(io::Error::other(format!(
                "{}: only files and directories are supported",
                e.path().display()
            )));
        };
        nodes.insert(ino, node);
        entries.insert(e.file_name(), ino);
    }
    Ok(entries)
}

/// Replaces the contents of `dir` with `tree` (from [`ROOT`]).
pub fn save(dir: &Path, tree: &HashMap<u64, Node>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if fs::symlink_metadata(&p)?.is_dir() {
            fs::remove_dir_all(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
    }
    let mut written: HashMap<u64, std::path::PathBuf> = HashMap::new();
    if let Some(Node::Dir { entries, .. }) = tree.get(&ROOT) {
        save_dir(dir, entries, tree, &mut written)?;
    }
    // The backing filesystem's own durability is not what is tested: sync it all once.
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    Ok(())
}

fn save_dir(
    dir: &Path,
    entries: &BTreeMap<std::ffi::OsString, u64>,
    tree: &HashMap<u64, Node>,
    written: &mut HashMap<u64, std::path::PathBuf>,
) -> io::Result<()> {
    for (name, ino) in entries {
        let path = dir.join(name);
        match tree.get(ino) {
            Some(Node::Dir { entries, mode }) => {
                fs::create_dir(&path)?;
                save_dir(&path, entries, tree, written)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
            }
            Some(Node::File { data, mode }) => {
                if let Some(first) = written.get(ino) {
                    fs::hard_link(first, &path)?;
                } else {
                    fs::write(&path, data)?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
                    written.insert(*ino, path);
                }
            }
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use std::ffi::OsStr;

    #[test]
    fn save_then_load_gives_the_same_tree() {
        let mut m = Model::empty();
        let d = m
            .create(
                ROOT,
                OsStr::new("d"),
                Node::Dir {
                    entries: BTreeMap::new(),
                    mode: 0o700,
                },
            )
            .unwrap();
        let f = m
            .create(
                d,
                OsStr::new("f"),
                Node::File {
                    data: Vec::new(),
                    mode: 0o600,
                },
            )
            .unwrap();
        m.write(f, 0, b"data").unwrap();
        m.link(f, ROOT, OsStr::new("g")).unwrap();
        for i in [f, d, ROOT] {
            m.fsync(i).unwrap();
        }
        let tmp = tempfile::tempdir().unwrap();
        save(tmp.path(), &m.durable_tree()).unwrap();
        let back = Model::from_durable(load(tmp.path()).unwrap());
        let (bf, bg) = (back.resolve("d/f").unwrap(), back.resolve("g").unwrap());
        assert_eq!(bf, bg, "hard links stay one file");
        assert_eq!(back.read(bf, 0, 100), Ok(&b"data"[..]));
        assert_eq!(back.node(bf).unwrap().mode(), 0o600);
        assert_eq!(back.node(back.resolve("d").unwrap()).unwrap().mode(), 0o700);
        // Saving again replaces what was there.
        save(tmp.path(), &Model::empty().durable_tree()).unwrap();
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
