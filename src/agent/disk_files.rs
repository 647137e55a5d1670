//! A VM's disk images as the agent keeps them: opened by the operation that needs them and
//! closed when it ends. An idle VM holds no descriptor, so how many VMs one agent serves is
//! not bounded by its open-file limit.
//!
//! Durability is per file, not per descriptor: an fsync through a later descriptor makes
//! durable what an earlier one wrote, and reports a writeback error nobody has seen yet.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use super::{ApiError, ApiResult};

pub(super) struct DiskFiles {
    vm: String,
    paths: Vec<PathBuf>,
}

impl DiskFiles {
    pub(super) fn new(vm: &str, paths: Vec<PathBuf>) -> Self {
        DiskFiles {
            vm: vm.to_string(),
            paths,
        }
    }

    /// No files: a hypervisor domain on its own images.
    pub(super) fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.paths.len()
    }

    /// Disk `i`, open for reading and writing.
    pub(super) fn open(&self, i: usize) -> ApiResult<File> {
        let path = self.paths.get(i).ok_or_else(|| {
            ApiError::conflict(format!("VM {} keeps no disk files here", self.vm))
        })?;
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(ApiError::io)
    }

    /// Every disk, open, in order (for an operation that touches them all).
    pub(super) fn open_all(&self) -> ApiResult<Vec<File>> {
        (0..self.paths.len()).map(|i| self.open(i)).collect()
    }

    /// Makes every disk's data and size durable.
    pub(super) fn sync_all(&self) -> ApiResult<()> {
        for f in self.open_all()? {
            f.sync_all().map_err(ApiError::io)?;
        }
        Ok(())
    }
}
