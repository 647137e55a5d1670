//! `--wait`: follows the jobs an action started until they end, printing each step as it
//! ends (and, on a terminal, as it starts).

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use jiff::Timestamp;

use super::PluginError;
use super::render::{Style, job_line, step_line, strip_ansi};
use crate::api::{Job, JobState, StepState};

/// Polling period of the followed object.
const POLL: Duration = Duration::from_millis(500);

/// What one poll of the followed object shows.
pub struct Observed {
    pub jobs: Vec<Job>,
    /// The object has settled: the controller saw the change and runs nothing more for it.
    pub settled: bool,
    /// Stop following although a job runs (it waits for a person).
    pub pause: bool,
}

/// A job run: its name and attempt.
type Run = (String, i64);

fn run_of(j: &Job) -> Run {
    (j.name.clone(), j.attempt.unwrap_or(1))
}

pub struct Follower {
    /// Job runs that existed before the action: not followed.
    before: Vec<Run>,
    /// Per followed run, the state of each step last printed.
    printed: HashMap<Run, Vec<Option<StepState>>>,
    ended: Vec<Run>,
    style: Style,
    /// Print steps as they start too (a terminal; not in scripts, whose output would then
    /// depend on how fast the poll was).
    show_running: bool,
}

impl Follower {
    pub fn new(before: &[Job], style: Style, show_running: bool) -> Self {
        Self {
            before: before.iter().map(run_of).collect(),
            printed: HashMap::new(),
            ended: vec![],
            style,
            show_running,
        }
    }

    /// The job runs started since the action, as they are now.
    fn new_runs<'a>(&self, jobs: &'a [Job]) -> Vec<&'a Job> {
        jobs.iter()
            .filter(|j| !self.before.contains(&run_of(j)))
            .collect()
    }

    fn line(cells: Vec<String>) -> String {
        cells
            .into_iter()
            .filter(|c| !strip_ansi(c).is_empty())
            .collect::<Vec<_>>()
            .join("  ")
    }

    /// Prints what changed since the last poll; true once the followed jobs have all ended
    /// and the object has settled.
    pub fn observe(&mut self, o: &Observed, out: &mut impl Write) -> std::io::Result<bool> {
        let now = Timestamp::now();
        let runs = self.new_runs(&o.jobs);
        for j in &runs {
            let run = run_of(j);
            if !self.printed.contains_key(&run) {
                let mut head = job_line(j, now, self.style);
                // Started: state and duration come with its end.
                head.truncate(3);
                writeln!(out, "{}", Self::line(head))?;
                self.printed.insert(run.clone(), vec![]);
            }
            let Some(printed) = self.printed.get_mut(&run) else {
                continue;
            };
            printed.resize(j.steps.len(), None);
            for (s, last) in j.steps.iter().zip(printed.iter_mut()) {
                let show = match s.state {
                    StepState::Pending => false,
                    StepState::Running => self.show_running,
                    _ => true,
                };
                if show && *last != Some(s.state) {
                    let mut cells = step_line(s, now, self.style);
                    if s.state == StepState::Running {
                        cells.truncate(2);
                    }
                    writeln!(out, "  {}", Self::line(cells))?;
                    *last = Some(s.state);
                }
            }
            if j.state != JobState::Running && !self.ended.contains(&run) {
                let cells = job_line(j, now, self.style);
                writeln!(
                    out,
                    "{}",
                    Self::line(vec![cells[0].clone(), cells[3].clone(), cells[4].clone()])
                )?;
                self.ended.push(run);
            }
        }
        out.flush()?;
        let running = runs.iter().any(|j| j.state == JobState::Running);
        Ok(o.pause || (!runs.is_empty() && !running && o.settled))
    }

    /// The followed runs that failed, by name.
    pub fn failed(&self, jobs: &[Job]) -> Vec<String> {
        self.new_runs(jobs)
            .into_iter()
            .filter(|j| j.state == JobState::Failed)
            .map(|j| j.name.clone())
            .collect()
    }
}

/// Polls with `get` until the follower is done or `timeout` passes; returns the last jobs.
pub async fn follow<F, Fut>(
    mut f: Follower,
    mut get: F,
    timeout: Duration,
    out: &mut impl Write,
) -> Result<Vec<Job>, PluginError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Observed, PluginError>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let o = get().await?;
        if f.observe(&o, out).map_err(PluginError::Output)? {
            if o.pause {
                return Ok(o.jobs);
            }
            let failed = f.failed(&o.jobs);
            if failed.is_empty() {
                return Ok(o.jobs);
            }
            return Err(PluginError::JobFailed(failed.join(", ")));
        }
        if Instant::now() > deadline {
            return Err(PluginError::Timeout(timeout.as_secs()));
        }
        tokio::time::sleep(POLL).await;
    }
}
