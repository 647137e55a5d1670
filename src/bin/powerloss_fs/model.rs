//! The filesystem model: what the mounted tree holds now, and what would survive a power cut.
//!
//! POSIX promises, and nothing more: `fsync` of a file makes its data and size durable;
//! creating, renaming, removing or linking a name is durable only after `fsync` of the
//! directory that holds the name. Where POSIX leaves the outcome open, the harshest one is
//! taken, always the same: a rename whose target directory was not synced comes back under its
//! old name (or not at all, when only the source directory was synced); a new file whose
//! directory was synced but not the file comes back empty. A rename becomes durable as a whole
//! when its target directory is synced (the old name goes then too), as on a journaling
//! filesystem that commits a rename in one transaction.
//!
//! Pure: no I/O. The FUSE layer (`main.rs`) maps requests onto it; `backing.rs` loads and
//! saves the durable tree.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};

pub const ROOT: u64 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File {
        data: Vec<u8>,
        mode: u32,
    },
    Dir {
        entries: BTreeMap<OsString, u64>,
        mode: u32,
    },
}

impl Node {
    pub fn mode(&self) -> u32 {
        match self {
            Node::File { mode, .. } | Node::Dir { mode, .. } => *mode,
        }
    }
    fn empty_like(&self) -> Node {
        match self {
            Node::File { mode, .. } => Node::File {
                data: Vec::new(),
                mode: *mode,
            },
            Node::Dir { mode, .. } => Node::Dir {
                entries: BTreeMap::new(),
                mode: *mode,
            },
        }
    }
}

/// Errors as the errno the FUSE layer answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsError {
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    Invalid,
}

/// A rename not yet durable at its target: once the target directory is synced, the old name
/// goes too.
#[derive(Clone, Debug)]
struct Moved {
    from_dir: u64,
    from_name: OsString,
    ino: u64,
}

#[derive(Clone, Debug)]
pub struct Model {
    now: HashMap<u64, Node>,
    durable: HashMap<u64, Node>,
    /// Names per inode in `now` (hard links; 0: unlinked, kept while open).
    links: HashMap<u64, u32>,
    open: HashMap<u64, u32>,
    moved: Vec<Moved>,
    next_ino: u64,
}

impl Model {
    /// A model whose whole tree (root = [`ROOT`]) is durable.
    pub fn from_durable(nodes: HashMap<u64, Node>) -> Model {
        let next_ino = nodes.keys().max().copied().unwrap_or(ROOT) + 1;
        let mut m = Model {
            now: nodes.clone(),
            durable: nodes,
            links: HashMap::new(),
            open: HashMap::new(),
            moved: Vec::new(),
            next_ino,
        };
        m.now.entry(ROOT).or_insert(Node::Dir {
            entries: BTreeMap::new(),
            mode: 0o755,
        });
        m.durable.insert(ROOT, m.now[&ROOT].clone());
        m.count_links();
        m
    }

    #[cfg(test)]
    pub fn empty() -> Model {
        Model::from_durable(HashMap::new())
    }

    fn count_links(&mut self) {
        self.links.clear();
        for n in self.now.values() {
            if let Node::Dir { entries, .. } = n {
                for ino in entries.values() {
                    *self.links.entry(*ino).or_default() += 1;
                }
            }
        }
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        self.now.get(&ino)
    }

    pub fn links(&self, ino: u64) -> u32 {
        if ino == ROOT {
            return 2;
        }
        self.links.get(&ino).copied().unwrap_or(0)
    }

    fn dir(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, FsError> {
        match self.now.get(&ino) {
            Some(Node::Dir { entries, .. }) => Ok(entries),
            Some(Node::File { .. }) => Err(FsError::NotDir),
            None => Err(FsError::NotFound),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, FsError> {
        match self.now.get_mut(&ino) {
            Some(Node::Dir { entries, .. }) => Ok(entries),
            Some(Node::File { .. }) => Err(FsError::NotDir),
            None => Err(FsError::NotFound),
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, FsError> {
        self.dir(parent)?
            .get(name)
            .copied()
            .ok_or(FsError::NotFound)
    }

    pub fn entries(&self, dir: u64) -> Result<Vec<(OsString, u64)>, FsError> {
        Ok(self
            .dir(dir)?
            .iter()
            .map(|(n, i)| (n.clone(), *i))
            .collect())
    }

    /// A new file or directory named `name` in `parent`. Durable: an empty node, reachable
    /// only once `parent` is synced.
    pub fn create(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<u64, FsError> {
        if self.dir(parent)?.contains_key(name) {
            return Err(FsError::Exists);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.durable.insert(ino, node.empty_like());
        self.now.insert(ino, node);
        self.dir_mut(parent)?.insert(name.to_owned(), ino);
        self.links.insert(ino, 1);
        Ok(ino)
    }

    pub fn link(&mut self, ino: u64, parent: u64, name: &OsStr) -> Result<(), FsError> {
        match self.now.get(&ino) {
            Some(Node::File { .. }) => {}
            Some(Node::Dir { .. }) => return Err(FsError::IsDir),
            None => return Err(FsError::NotFound),
        }
        if self.dir(parent)?.contains_key(name) {
            return Err(FsError::Exists);
        }
        self.dir_mut(parent)?.insert(name.to_owned(), ino);
        *self.links.entry(ino).or_default() += 1;
        Ok(())
    }

    /// Removes a name (`dir`: rmdir, else unlink).
    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), FsError> {
        let ino = self.lookup(parent, name)?;
        match (self.now.get(&ino), dir) {
            (Some(Node::Dir { entries, .. }), true) if !entries.is_empty() => {
                return Err(FsError::NotEmpty);
            }
            (Some(Node::Dir { .. }), false) => return Err(FsError::IsDir),
            (Some(Node::File { .. }), true) => return Err(FsError::NotDir),
            _ => {}
        }
        self.dir_mut(parent)?.remove(name);
        self.unlinked(ino);
        Ok(())
    }

    fn unlinked(&mut self, ino: u64) {
        let n = self.links.entry(ino).or_default();
        *n = n.saturating_sub(1);
        self.collect(ino);
    }

    /// Drops an inode nothing names or holds open now, and that no durable name reaches.
    fn collect(&mut self, ino: u64) {
        if self.links(ino) > 0 || self.open.get(&ino).copied().unwrap_or(0) > 0 {
            return;
        }
        self.now.remove(&ino);
        self.links.remove(&ino);
        if !self.durably_named(ino) {
            self.durable.remove(&ino);
        }
    }

    fn durably_named(&self, ino: u64) -> bool {
        self.durable.values().any(|n| match n {
            Node::Dir { entries, .. } => entries.values().any(|i| *i == ino),
            Node::File { .. } => false,
        })
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        to_parent: u64,
        to_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), FsError> {
        let ino = self.lookup(parent, name)?;
        self.dir(to_parent)?;
        if parent == to_parent && name == to_name {
            return Ok(());
        }
        if let Ok(old) = self.lookup(to_parent, to_name) {
            if no_replace {
                return Err(FsError::Exists);
            }
            match (self.now.get(&ino), self.now.get(&old)) {
                (Some(Node::Dir { .. }), Some(Node::Dir { entries, .. }))
                    if !entries.is_empty() =>
                {
                    return Err(FsError::NotEmpty);
                }
                (Some(Node::Dir { .. }), Some(Node::Dir { .. })) => {}
                (Some(Node::Dir { .. }), _) => return Err(FsError::NotDir),
                (_, Some(Node::Dir { .. })) => return Err(FsError::IsDir),
                _ => {}
            }
            if old == ino {
                return Ok(());
            }
            self.dir_mut(to_parent)?.remove(to_name);
            self.unlinked(old);
        }
        if matches!(self.now.get(&ino), Some(Node::Dir { .. })) && self.under(to_parent, ino) {
            return Err(FsError::Invalid);
        }
        self.dir_mut(parent)?.remove(name);
        self.dir_mut(to_parent)?.insert(to_name.to_owned(), ino);
        if parent != to_parent {
            self.moved.push(Moved {
                from_dir: parent,
                from_name: name.to_owned(),
                ino,
            });
        }
        Ok(())
    }

    /// Whether `dir` is `ancestor` or below it.
    fn under(&self, dir: u64, ancestor: u64) -> bool {
        let mut stack = vec![ancestor];
        let mut seen = HashSet::new();
        while let Some(d) = stack.pop() {
            if d == dir {
                return true;
            }
            if !seen.insert(d) {
                continue;
            }
            if let Some(Node::Dir { entries, .. }) = self.now.get(&d) {
                stack.extend(entries.values().copied());
            }
        }
        false
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<&[u8], FsError> {
        match self.now.get(&ino) {
            Some(Node::File { data, .. }) => {
                let start = (offset as usize).min(data.len());
                let end = start.saturating_add(size as usize).min(data.len());
                Ok(&data[start..end])
            }
            Some(Node::Dir { .. }) => Err(FsError::IsDir),
            None => Err(FsError::NotFound),
        }
    }

    pub fn write(&mut self, ino: u64, offset: u64, bytes: &[u8]) -> Result<(), FsError> {
        match self.now.get_mut(&ino) {
            Some(Node::File { data, .. }) => {
                let start = usize::try_from(offset).map_err(|_| FsError::Invalid)?;
                let end = start.checked_add(bytes.len()).ok_or(FsError::Invalid)?;
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[start..end].copy_from_slice(bytes);
                Ok(())
            }
            Some(Node::Dir { .. }) => Err(FsError::IsDir),
            None => Err(FsError::NotFound),
        }
    }

    pub fn truncate(&mut self, ino: u64, size: u64) -> Result<(), FsError> {
        match self.now.get_mut(&ino) {
            Some(Node::File { data, .. }) => {
                data.resize(usize::try_from(size).map_err(|_| FsError::Invalid)?, 0);
                Ok(())
            }
            Some(Node::Dir { .. }) => Err(FsError::IsDir),
            None => Err(FsError::NotFound),
        }
    }

    /// Permission bits: durable at once (the agent's modes are set before anything depends on
    /// them, and no invariant is about them).
    pub fn chmod(&mut self, ino: u64, to: u32) -> Result<(), FsError> {
        for tree in [&mut self.now, &mut self.durable] {
            if let Some(Node::File { mode, .. } | Node::Dir { mode, .. }) = tree.get_mut(&ino) {
                *mode = to & 0o7777;
            }
        }
        if self.now.contains_key(&ino) {
            Ok(())
        } else {
            Err(FsError::NotFound)
        }
    }

    pub fn opened(&mut self, ino: u64) {
        *self.open.entry(ino).or_default() += 1;
    }

    pub fn released(&mut self, ino: u64) {
        let n = self.open.entry(ino).or_default();
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.open.remove(&ino);
        }
        self.collect(ino);
    }

    /// `fsync` (or `fdatasync`): a file's data and size, or a directory's entries, become
    /// durable.
    pub fn fsync(&mut self, ino: u64) -> Result<(), FsError> {
        let node = self.now.get(&ino).ok_or(FsError::NotFound)?.clone();
        if let Node::Dir { entries, .. } = &node {
            let before: HashSet<u64> = match self.durable.get(&ino) {
                Some(Node::Dir { entries, .. }) => entries.values().copied().collect(),
                _ => HashSet::new(),
            };
            // A rename into this directory is durable now, so its old name goes with it.
            let mut keep = Vec::new();
            for m in std::mem::take(&mut self.moved) {
                let arrived = entries.values().any(|i| *i == m.ino) && !before.contains(&m.ino);
                if arrived && m.from_dir != ino {
                    if let Some(Node::Dir { entries: from, .. }) = self.durable.get_mut(&m.from_dir)
                        && from.get(&m.from_name) == Some(&m.ino)
                    {
                        from.remove(&m.from_name);
                    }
                } else if m.from_dir != ino {
                    keep.push(m);
                }
            }
            self.moved = keep;
            for child in entries.values() {
                if !self.durable.contains_key(child)
                    && let Some(n) = self.now.get(child)
                {
                    self.durable.insert(*child, n.empty_like());
                }
            }
            self.durable.insert(ino, node);
            self.gc_durable();
        } else {
            self.durable.insert(ino, node);
        }
        Ok(())
    }

    /// Forgets durable nodes that neither the durable tree nor the live one reaches.
    fn gc_durable(&mut self) {
        let reach = reachable(&self.durable);
        let now = &self.now;
        self.durable
            .retain(|ino, _| reach.contains(ino) || now.contains_key(ino));
    }

    /// The durable tree, from the root (what a power cut leaves).
    pub fn durable_tree(&self) -> HashMap<u64, Node> {
        let reach = reachable(&self.durable);
        self.durable
            .iter()
            .filter(|(i, _)| reach.contains(i))
            .map(|(i, n)| (*i, n.clone()))
            .collect()
    }

    /// The power cut: everything not durable is gone (the binary does it by saving the
    /// durable tree and mounting it anew).
    #[cfg(test)]
    pub fn cut(&mut self) {
        *self = Model::from_durable(self.durable_tree());
    }

    /// Path-level view for tests: the file at `path` (names separated by `/`) now.
    #[cfg(test)]
    pub fn resolve(&self, path: &str) -> Option<u64> {
        let mut ino = ROOT;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = self.lookup(ino, OsStr::new(part)).ok()?;
        }
        Some(ino)
    }
}

fn reachable(tree: &HashMap<u64, Node>) -> HashSet<u64> {
    let mut seen = HashSet::new();
    let mut stack = vec![ROOT];
    while let Some(i) = stack.pop() {
        if !seen.insert(i) {
            continue;
        }
        if let Some(Node::Dir { entries, .. }) = tree.get(&i) {
            stack.extend(entries.values().copied());
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> Node {
        Node::File {
            data: Vec::new(),
            mode: 0o644,
        }
    }
    fn dir() -> Node {
        Node::Dir {
            entries: BTreeMap::new(),
            mode: 0o755,
        }
    }
    fn n(s: &str) -> &OsStr {
        OsStr::new(s)
    }
    fn contents(m: &Model, path: &str) -> Option<Vec<u8>> {
        let ino = m.resolve(path)?;
        Some(m.read(ino, 0, u32::MAX).ok()?.to_vec())
    }

    #[test]
    fn unsynced_file_and_name_are_lost() {
        let mut m = Model::empty();
        let f = m.create(ROOT, n("a"), file()).unwrap();
        m.write(f, 0, b"hello").unwrap();
        m.fsync(f).unwrap();
        m.cut();
        assert_eq!(m.resolve("a"), None, "the name needs a directory fsync");
    }

    #[test]
    fn synced_name_without_synced_data_comes_back_empty() {
        let mut m = Model::empty();
        let f = m.create(ROOT, n("a"), file()).unwrap();
        m.write(f, 0, b"hello").unwrap();
        m.fsync(ROOT).unwrap();
        m.cut();
        assert_eq!(contents(&m, "a"), Some(Vec::new()));
    }

    #[test]
    fn data_after_fsync_is_lost_and_size_is_the_synced_one() {
        let mut m = Model::empty();
        let f = m.create(ROOT, n("a"), file()).unwrap();
        m.write(f, 0, b"hello").unwrap();
        m.fsync(f).unwrap();
        m.fsync(ROOT).unwrap();
        m.write(f, 0, b"J").unwrap();
        m.write(f, 5, b" world").unwrap();
        m.cut();
        assert_eq!(contents(&m, "a"), Some(b"hello".to_vec()));
        // A truncate is not durable either.
        let f = m.resolve("a").unwrap();
        m.truncate(f, 1).unwrap();
        m.cut();
        assert_eq!(contents(&m, "a"), Some(b"hello".to_vec()));
    }

    #[test]
    fn write_tmp_then_rename_needs_the_directory_fsync() {
        let mut m = Model::empty();
        let f = m.create(ROOT, n("vm.json"), file()).unwrap();
        m.write(f, 0, b"old").unwrap();
        m.fsync(f).unwrap();
        m.fsync(ROOT).unwrap();
        let t = m.create(ROOT, n("vm.json.tmp"), file()).unwrap();
        m.write(t, 0, b"new").unwrap();
        m.fsync(t).unwrap();
        m.rename(ROOT, n("vm.json.tmp"), ROOT, n("vm.json"), false)
            .unwrap();
        assert_eq!(contents(&m, "vm.json"), Some(b"new".to_vec()));
        let mut lost = m.clone();
        lost.cut();
        assert_eq!(contents(&lost, "vm.json"), Some(b"old".to_vec()));
        assert_eq!(lost.resolve("vm.json.tmp"), None);
        m.fsync(ROOT).unwrap();
        m.cut();
        assert_eq!(contents(&m, "vm.json"), Some(b"new".to_vec()));
        assert_eq!(m.resolve("vm.json.tmp"), None);
    }

    #[test]
    fn rename_across_directories_is_durable_with_its_target() {
        let mut m = Model::empty();
        let a = m.create(ROOT, n("a"), dir()).unwrap();
        let b = m.create(ROOT, n("b"), dir()).unwrap();
        let f = m.create(a, n("f"), file()).unwrap();
        m.write(f, 0, b"x").unwrap();
        for i in [f, a, b, ROOT] {
            m.fsync(i).unwrap();
        }
        m.rename(a, n("f"), b, n("g"), false).unwrap();
        // Only the source synced: the file is nowhere.
        let mut src = m.clone();
        src.fsync(a).unwrap();
        src.cut();
        assert_eq!(src.resolve("a/f"), None);
        assert_eq!(src.resolve("b/g"), None);
        // Nothing synced: the old name.
        let mut none = m.clone();
        none.cut();
        assert_eq!(contents(&none, "a/f"), Some(b"x".to_vec()));
        assert_eq!(none.resolve("b/g"), None);
        // The target synced: the new name only.
        m.fsync(b).unwrap();
        m.cut();
        assert_eq!(contents(&m, "b/g"), Some(b"x".to_vec()));
        assert_eq!(m.resolve("a/f"), None);
    }

    #[test]
    fn unsynced_remove_comes_back_and_synced_remove_is_gone() {
        let mut m = Model::empty();
        let d = m.create(ROOT, n("d"), dir()).unwrap();
        let f = m.create(d, n("f"), file()).unwrap();
        m.write(f, 0, b"keep").unwrap();
        for i in [f, d, ROOT] {
            m.fsync(i).unwrap();
        }
        m.remove(d, n("f"), false).unwrap();
        assert_eq!(m.remove(ROOT, n("d"), true), Ok(()));
        let mut lost = m.clone();
        lost.cut();
        assert_eq!(contents(&lost, "d/f"), Some(b"keep".to_vec()));
        m.fsync(ROOT).unwrap();
        m.cut();
        assert_eq!(m.resolve("d"), None);
    }

    #[test]
    fn a_new_directory_needs_its_parent_synced_and_its_own_entries_synced() {
        let mut m = Model::empty();
        let d = m.create(ROOT, n("d"), dir()).unwrap();
        let f = m.create(d, n("f"), file()).unwrap();
        m.write(f, 0, b"1").unwrap();
        m.fsync(f).unwrap();
        m.fsync(d).unwrap();
        let mut no_parent = m.clone();
        no_parent.cut();
        assert_eq!(no_parent.resolve("d"), None);
        m.fsync(ROOT).unwrap();
        m.cut();
        assert_eq!(contents(&m, "d/f"), Some(b"1".to_vec()));
    }

    #[test]
    fn hard_links_share_data() {
        let mut m = Model::empty();
        let f = m.create(ROOT, n("a"), file()).unwrap();
        m.link(f, ROOT, n("b")).unwrap();
        assert_eq!(m.links(f), 2);
        m.write(f, 0, b"z").unwrap();
        m.fsync(f).unwrap();
        m.fsync(ROOT).unwrap();
        m.cut();
        let (a, b) = (m.resolve("a").unwrap(), m.resolve("b").unwrap());
        assert_eq!(a, b);
        assert_eq!(contents(&m, "b"), Some(b"z".to_vec()));
    }

    #[test]
    fn errors_as_posix_has_them() {
        let mut m = Model::empty();
        let d = m.create(ROOT, n("d"), dir()).unwrap();
        m.create(d, n("f"), file()).unwrap();
        assert_eq!(m.create(ROOT, n("d"), file()), Err(FsError::Exists));
        assert_eq!(m.remove(ROOT, n("d"), true), Err(FsError::NotEmpty));
        assert_eq!(m.remove(ROOT, n("d"), false), Err(FsError::IsDir));
        assert_eq!(m.remove(d, n("f"), true), Err(FsError::NotDir));
        assert_eq!(
            m.rename(ROOT, n("d"), d, n("inside"), false),
            Err(FsError::Invalid)
        );
        let g = m.create(ROOT, n("g"), file()).unwrap();
        assert_eq!(
            m.rename(ROOT, n("g"), ROOT, n("d"), false),
            Err(FsError::IsDir)
        );
        assert_eq!(
            m.rename(ROOT, n("g"), d, n("f"), true),
            Err(FsError::Exists)
        );
        assert_eq!(m.lookup(ROOT, n("g")), Ok(g));
    }

    #[test]
    fn an_unlinked_open_file_lives_until_released() {
        let mut m = Model::empty();
        let f = m.create(ROOT, n("a"), file()).unwrap();
        m.opened(f);
        m.remove(ROOT, n("a"), false).unwrap();
        m.write(f, 0, b"still").unwrap();
        assert_eq!(m.read(f, 0, 10), Ok(&b"still"[..]));
        m.released(f);
        assert_eq!(m.read(f, 0, 10), Err(FsError::NotFound));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            Write { file: usize, at: u8, len: u8 },
            Sync { file: usize },
            SyncDir,
            Replace { file: usize },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0..3usize, any::<u8>(), 1..32u8).prop_map(|(file, at, len)| Op::Write {
                    file,
                    at,
                    len
                }),
                (0..3usize).prop_map(|file| Op::Sync { file }),
                Just(Op::SyncDir),
                (0..3usize).prop_map(|file| Op::Replace { file }),
            ]
        }

        proptest! {
            /// After any sequence and a cut, each file reads as the content it had at its last
            /// sync point: the data of its last `fsync` before the directory's last `fsync` made
            /// its current name durable (here, names are replaced by write-tmp-and-rename).
            #[test]
            fn a_cut_leaves_exactly_what_was_synced(ops in proptest::collection::vec(op(), 0..60)) {
                let names = ["f0", "f1", "f2"];
                let mut m = Model::empty();
                for name in names {
                    m.create(ROOT, n(name), file()).unwrap();
                }
                m.fsync(ROOT).unwrap();
                // What each name's inode holds now / at its last fsync, and what a cut shows.
                let mut now: Vec<Vec<u8>> = vec![Vec::new(); 3];
                let mut synced: Vec<Vec<u8>> = vec![Vec::new(); 3];
                let mut durable: Vec<Vec<u8>> = vec![Vec::new(); 3];
                // A replaced name: the durable inode stays the old one until the dir sync.
                let mut renamed = [false; 3];
                let mut fill = 0u8;
                for op in ops {
                    match op {
                        Op::Write { file: i, at, len } => {
                            fill = fill.wrapping_add(1);
                            let bytes = vec![fill; len as usize];
                            let ino = m.resolve(names[i]).unwrap();
                            m.write(ino, at as u64, &bytes).unwrap();
                            let end = at as usize + len as usize;
                            if now[i].len() < end { now[i].resize(end, 0); }
                            now[i][at as usize..end].copy_from_slice(&bytes);
                            if !renamed[i] { /* durable unchanged until fsync */ }
                        }
                        Op::Sync { file: i } => {
                            let ino = m.resolve(names[i]).unwrap();
                            m.fsync(ino).unwrap();
                            synced[i] = now[i].clone();
                            if !renamed[i] { durable[i] = synced[i].clone(); }
                        }
                        Op::SyncDir => {
                            m.fsync(ROOT).unwrap();
                            for i in 0..3 {
                                if renamed[i] { durable[i] = synced[i].clone(); renamed[i] = false; }
                            }
                        }
                        Op::Replace { file: i } => {
                            let t = m.create(ROOT, n("tmp"), file()).unwrap();
                            m.write(t, 0, &now[i]).unwrap();
                            m.fsync(t).unwrap();
                            m.rename(ROOT, n("tmp"), ROOT, n(names[i]), false).unwrap();
                            synced[i] = now[i].clone();
                            renamed[i] = true;
                        }
                    }
                    let mut cut = m.clone();
                    cut.cut();
                    for i in 0..3 {
                        prop_assert_eq!(contents(&cut, names[i]), Some(durable[i].clone()));
                    }
                    prop_assert_eq!(cut.resolve("tmp"), None);
                }
            }
        }
    }
}
