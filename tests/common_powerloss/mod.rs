//! A directory on the power-loss filesystem (`twinsite-powerloss-fs`): whatever was not made
//! durable (file fsync, directory fsync) is gone after [`PowerLossDir::cut`].
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

pub struct PowerLossDir {
    /// Where the agent (or a test) reads and writes.
    pub mountpoint: PathBuf,
    /// The durable state, as of the last cut.
    pub backing: PathBuf,
    proc: Option<(Child, ChildStdin, BufReader<ChildStdout>)>,
}

impl PowerLossDir {
    /// Mounts a new, empty filesystem at `mountpoint` (created), its durable state beside it.
    pub fn new(mountpoint: &Path) -> Result<Self, String> {
        let backing = mountpoint.with_extension("durable");
        for d in [mountpoint, &backing] {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        let mut d = PowerLossDir {
            mountpoint: mountpoint.to_path_buf(),
            backing,
            proc: None,
        };
        d.mount()?;
        Ok(d)
    }

    fn mount(&mut self) -> Result<(), String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_twinsite-powerloss-fs"))
            .arg(&self.backing)
            .arg(&self.mountpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting twinsite-powerloss-fs: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("twinsite-powerloss-fs without pipes".into());
        };
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        if line.trim() != "mounted" {
            let _ = child.kill();
            let st = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(format!(
                "twinsite-powerloss-fs did not mount {}: {st}",
                self.mountpoint.display()
            ));
        }
        self.proc = Some((child, stdin, stdout));
        Ok(())
    }

    /// The power cut, then a fresh mount of what survived. Whatever uses the mount must be
    /// dead already (its open files go with the old mount).
    pub fn cut(&mut self) -> Result<(), String> {
        let Some((mut child, mut stdin, mut stdout)) = self.proc.take() else {
            return Err("not mounted".into());
        };
        writeln!(stdin, "cut").map_err(|e| format!("cut: {e}"))?;
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let st = child.wait().map_err(|e| format!("cut: {e}"))?;
        if line.trim() != "cut" || !st.success() {
            return Err(format!("the power cut failed: {st}"));
        }
        self.mount()
    }
}

impl Drop for PowerLossDir {
    fn drop(&mut self) {
        if let Some((mut child, stdin, _)) = self.proc.take() {
            // End of input: it unmounts and exits.
            drop(stdin);
            let _ = child.wait();
        }
    }
}
