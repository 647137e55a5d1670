//! Keeps the processes of `twinsite local` running: one that exits (an agent killed to try a
//! site fault, a crash) is reported and started again with the same command, so the stack
//! outlives a drill. A process that keeps exiting right after its start is given up on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::LocalError;
use crate::envtest::{EnvtestError, ManagedChild};

/// A run shorter than this counts as a failed start.
const QUICK_EXIT: Duration = Duration::from_secs(10);
/// Failed starts in a row before the stack gives up.
const MAX_QUICK_EXITS: u32 = 3;

pub(super) struct Supervised {
    name: String,
    command: Box<dyn Fn() -> Command + Send>,
    log: PathBuf,
    child: ManagedChild,
    started: Instant,
    quick_exits: u32,
    restarts: u32,
}

impl Supervised {
    /// Starts `command()` with its output appended to `log`.
    pub(super) fn start(
        name: &str,
        command: Box<dyn Fn() -> Command + Send>,
        log: &Path,
    ) -> Result<Self, LocalError> {
        let child = ManagedChild::spawn(name, command(), log)?;
        Ok(Self {
            name: name.to_string(),
            command,
            log: log.to_path_buf(),
            child,
            started: Instant::now(),
            quick_exits: 0,
            restarts: 0,
        })
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Starts the process again if it has exited. `Ok(Some(report))` says what happened when
    /// it was restarted; an error when it exited right after each of its last starts.
    pub(super) fn keep_running(&mut self) -> Result<Option<String>, LocalError> {
        let status = match self.child.check_running() {
            Ok(()) => return Ok(None),
            Err(EnvtestError::Exited(_, status)) => status,
            Err(e) => e.to_string(),
        };
        let exited = format!("{} exited ({status})", self.name);
        let ran = self.started.elapsed();
        if ran < QUICK_EXIT {
            self.quick_exits += 1;
        } else {
            self.quick_exits = 0;
        }
        if self.quick_exits >= MAX_QUICK_EXITS {
            return Err(LocalError::Setup(format!(
                "{exited}, {MAX_QUICK_EXITS} times within {}s of its start; see {}",
                QUICK_EXIT.as_secs(),
                self.log.display()
            )));
        }
        self.child = ManagedChild::spawn(&self.name, (self.command)(), &self.log)?;
        self.started = Instant::now();
        self.restarts += 1;
        Ok(Some(format!(
            "{exited} after {}s; started again (restart {}, pid {}, log {})",
            ran.as_secs(),
            self.restarts,
            self.child.pid(),
            self.log.display()
        )))
    }
}
