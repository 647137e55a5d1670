//! Status as text: the VM table, one VM with its jobs as a tree, a job's step lines. Pure
//! functions of the objects and the time, so they are unit-tested without a cluster.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{Job, JobState, JobStep, ReplicatedVM, ReplicationProgress, StepState};

/// ANSI colours when the output is a terminal; nothing otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    pub color: bool,
}

impl Style {
    fn paint(self, code: &str, text: &str) -> String {
        if self.color && !text.is_empty() {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// Green for what is well, yellow for what is under way or needs a look, red for failure.
    pub fn state(self, text: &str) -> String {
        let code = match text {
            "Succeeded" | "Protected" | "Healthy" | "Replicating" | "True" => "32",
            "Failed" | "Critical" | "Error" | "Stalled" => "31",
            "Running" | "Warning" | "FailingOver" | "FailedOver" | "Reprotecting"
            | "InitialReplication" | "Resynchronizing" | "Pending" => "33",
            "Skipped" => "2",
            _ => return text.to_string(),
        };
        self.paint(code, text)
    }

    pub fn bold(self, text: &str) -> String {
        self.paint("1", text)
    }

    fn dim(self, text: &str) -> String {
        self.paint("2", text)
    }
}

/// `12s`, `4m10s`, `2h5m`, `3d4h`: how kubectl shows ages (status times are whole seconds).
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

fn secs_between(a: &Time, b: Timestamp) -> f64 {
    let ms = b.as_millisecond() - a.0.as_millisecond();
    ms as f64 / 1000.0
}

/// How long something that started at `start` ran: until `end`, or until `now` while it runs.
fn took(start: Option<&Time>, end: Option<&Time>, now: Timestamp) -> String {
    match (start, end) {
        (Some(s), Some(e)) => duration(secs_between(s, e.0)),
        (Some(s), None) => duration(secs_between(s, now)),
        _ => String::new(),
    }
}

fn ago(t: Option<&Time>, now: Timestamp) -> String {
    t.map(|t| format!("{} ago", duration(secs_between(t, now))))
        .unwrap_or_default()
}

/// `[#########-----------]  45%  29 MiB/64 MiB`
pub fn progress_bar(p: &ReplicationProgress, width: usize) -> String {
    let total = p.total_bytes.max(1) as f64;
    let done = (p.done_bytes.max(0) as f64 / total).min(1.0);
    let filled = (done * width as f64).floor() as usize;
    format!(
        "[{}{}] {:>3}%  {}/{}",
        "#".repeat(filled),
        "-".repeat(width - filled),
        p.percent,
        bytes(p.done_bytes),
        bytes(p.total_bytes)
    )
}

/// Bytes in binary units, one decimal above KiB.
pub fn bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Left-aligned columns two spaces apart; `cells` may hold ANSI codes (not counted).
fn table(rows: &[Vec<String>]) -> String {
    let visible = |s: &str| strip_ansi(s).chars().count();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| visible(s))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < r.len() {
                line.push_str(&" ".repeat(widths[c] - visible(cell) + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Text without ANSI colour codes.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `kubectl twinsite status`: one line per VM.
pub fn vm_table(vms: &[ReplicatedVM], all_namespaces: bool, now: Timestamp, st: Style) -> String {
    let mut rows = vec![];
    let mut head: Vec<&str> = vec![];
    if all_namespaces {
        head.push("NAMESPACE");
    }
    head.extend([
        "NAME",
        "PHASE",
        "ACTIVE",
        "REPLICATION",
        "HEALTH",
        "RPO",
        "LAST DRILL",
        "PROGRESS",
    ]);
    rows.push(head.iter().map(|h| st.bold(h)).collect());
    for v in vms {
        let s = v.status.clone().unwrap_or_default();
        let r = s.replication.as_ref();
        let mut row = vec![];
        if all_namespaces {
            row.push(v.metadata.namespace.clone().unwrap_or_default());
        }
        row.push(v.metadata.name.clone().unwrap_or_default());
        row.push(st.state(&s.phase.map(|p| format!("{p:?}")).unwrap_or_default()));
        row.push(s.active_site.clone().unwrap_or_default());
        row.push(st.state(&r.map(|r| format!("{:?}", r.state)).unwrap_or_default()));
        row.push(
            st.state(
                &r.and_then(|r| r.health)
                    .map(|h| format!("{h:?}"))
                    .unwrap_or_default(),
            ),
        );
        row.push(
            r.and_then(|r| r.rpo_seconds)
                .map(|s| duration(s as f64))
                .unwrap_or_default(),
        );
        row.push(
            s.last_drill
                .as_ref()
                .map(|d| format!("{} {}", st.state(&d.result), ago(d.time.as_ref(), now)))
                .unwrap_or_default(),
        );
        row.push(
            r.and_then(|r| r.progress.as_ref())
                .map(|p| progress_bar(p, 20))
                .unwrap_or_default(),
        );
        rows.push(row);
    }
    table(&rows)
}

fn job_state(s: JobState) -> &'static str {
    match s {
        JobState::Running => "Running",
        JobState::Succeeded => "Succeeded",
        JobState::Failed => "Failed",
    }
}

pub fn step_state(s: StepState) -> &'static str {
    match s {
        StepState::Pending => "Pending",
        StepState::Running => "Running",
        StepState::Succeeded => "Succeeded",
        StepState::Failed => "Failed",
        StepState::Skipped => "Skipped",
    }
}

/// One job's heading: name, type, sites, state, duration and attempt.
pub fn job_line(j: &Job, now: Timestamp, st: Style) -> Vec<String> {
    let sites = match (&j.source_site, &j.target_site) {
        (Some(a), Some(b)) => format!("{a} -> {b}"),
        (None, Some(b)) => format!("-> {b}"),
        (Some(a), None) => a.clone(),
        _ => String::new(),
    };
    let mut state = st.state(job_state(j.state));
    if let Some(a) = j.attempt.filter(|a| *a > 1) {
        state.push_str(&format!(" (attempt {a})"));
    }
    vec![
        st.bold(&j.name),
        format!("{:?}", j.type_),
        sites,
        state,
        took(j.start_time.as_ref(), j.end_time.as_ref(), now),
        j.message.clone().unwrap_or_default(),
    ]
}

/// One step: name, state, duration, message.
pub fn step_line(s: &JobStep, now: Timestamp, st: Style) -> Vec<String> {
    vec![
        s.name.clone(),
        st.state(step_state(s.state)),
        took(s.start_time.as_ref(), s.end_time.as_ref(), now),
        st.dim(s.message.as_deref().unwrap_or_default()),
    ]
}

/// `kubectl twinsite status NAME`: the VM, then its jobs and their steps as a tree.
pub fn vm_detail(v: &ReplicatedVM, now: Timestamp, st: Style) -> String {
    let s = v.status.clone().unwrap_or_default();
    let name = v.metadata.name.clone().unwrap_or_default();
    let ns = v.metadata.namespace.clone().unwrap_or_default();
    let desired = v
        .spec
        .active_site
        .clone()
        .unwrap_or_else(|| v.spec.primary_site.clone());
    let mut rows: Vec<Vec<String>> = vec![];
    let mut kv = |k: &str, val: String| rows.push(vec![format!("{k}:"), val]);
    kv(
        "Phase",
        st.state(&s.phase.map(|p| format!("{p:?}")).unwrap_or_default()),
    );
    kv(
        "Active site",
        format!(
            "{} (desired {desired})",
            s.active_site.as_deref().unwrap_or("-")
        ),
    );
    if let Some(r) = &s.replication {
        let mut text = st.state(&format!("{:?}", r.state));
        if let (Some(a), Some(b)) = (&r.source_site, &r.target_site) {
            text.push_str(&format!(" {a} -> {b}"));
        }
        if let Some(h) = r.health {
            text.push_str(&format!(", {}", st.state(&format!("{h:?}"))));
        }
        if let Some(rpo) = r.rpo_seconds {
            text.push_str(&format!(", RPO {}", duration(rpo as f64)));
        }
        kv("Replication", text);
        if let Some(p) = &r.progress {
            kv("Progress", progress_bar(p, 30));
        }
    }
    if let Some(rp) = &s.recovery_points {
        let latest = rp
            .latest
            .as_ref()
            .map(|l| format!(" (latest {}, {})", l.id, ago(l.time.as_ref(), now)))
            .unwrap_or_default();
        kv("Recovery points", format!("{}{latest}", rp.count));
    }
    if let Some(t) = &s.test_failover {
        kv(
            "Drill copy",
            format!("{} {} at {}", t.vm_name, st.state(&t.state), t.site),
        );
    }
    if let Some(d) = &s.last_drill {
        kv(
            "Last drill",
            format!(
                "{} {} {}",
                d.job,
                st.state(&d.result),
                ago(d.time.as_ref(), now)
            ),
        );
    }
    for c in s.conditions.iter().filter(|c| c.status == "True") {
        if c.type_ == "Stalled" || c.type_ == "CommitPending" || c.type_ == "Conflict" {
            kv(&c.type_, c.message.clone());
        }
    }
    let mut out = format!(
        "{} {}\n",
        st.bold(&name),
        st.dim(&format!("(namespace {ns})"))
    );
    for line in table(&rows).lines() {
        out.push_str(&format!("  {line}\n"));
    }
    out.push_str(&jobs_tree(&s.jobs, now, st));
    out
}

/// Jobs, newest last, each with its steps, drawn as a tree.
pub fn jobs_tree(jobs: &[Job], now: Timestamp, st: Style) -> String {
    if jobs.is_empty() {
        return "Jobs: none\n".into();
    }
    // The job lines line up across jobs; each job's steps line up among themselves.
    let job_rows: Vec<Vec<String>> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| {
            let mut row = job_line(j, now, st);
            let branch = if i + 1 == jobs.len() {
                "└─ "
            } else {
                "├─ "
            };
            row[0] = format!("{branch}{}", row[0]);
            row
        })
        .collect();
    let job_lines = table(&job_rows);
    let mut out = String::from("Jobs:\n");
    for ((i, j), line) in jobs.iter().enumerate().zip(job_lines.lines()) {
        out.push_str(line);
        out.push('\n');
        let trunk = if i + 1 == jobs.len() { "   " } else { "│  " };
        let step_rows: Vec<Vec<String>> = j
            .steps
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let mut row = step_line(s, now, st);
                let branch = if k + 1 == j.steps.len() {
                    "└─ "
                } else {
                    "├─ "
                };
                row[0] = format!("{trunk}{branch}{}", row[0]);
                row
            })
            .collect();
        out.push_str(&table(&step_rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> ReplicatedVM {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "twinsite.io/v1alpha1", "kind": "ReplicatedVM",
            "metadata": {"name": "web-01", "namespace": "finance"},
            "spec": {"primarySite": "primary", "recoverySite": "secondary"},
            "status": {
                "phase": "Protected", "activeSite": "primary",
                "replication": {"state": "Resynchronizing", "sourceSite": "primary",
                    "targetSite": "secondary", "health": "Healthy", "rpoSeconds": 42,
                    "progress": {"doneBytes": 512, "totalBytes": 1024, "percent": 50, "summary": "50%"}},
                "lastDrill": {"job": "web-01-testfailover-2", "time": "2026-01-01T00:00:00Z", "result": "Succeeded"},
                "jobs": [{
                    "name": "web-01-failover-3", "type": "PlannedFailover", "sourceSite": "primary",
                    "targetSite": "secondary", "state": "Succeeded",
                    "startTime": "2026-01-01T00:00:00Z", "endTime": "2026-01-01T00:00:03Z",
                    "steps": [
                        {"name": "ShutdownSource", "state": "Succeeded",
                         "startTime": "2026-01-01T00:00:00Z", "endTime": "2026-01-01T00:00:01Z"},
                        {"name": "StartAtTarget", "state": "Failed", "message": "boom",
                         "startTime": "2026-01-01T00:00:01Z", "endTime": "2026-01-01T00:00:03Z"}
                    ]
                }]
            }
        }))
        .unwrap()
    }

    fn now() -> Timestamp {
        "2026-01-01T00:02:00Z".parse().unwrap()
    }

    #[test]
    fn table_has_a_line_per_vm_with_its_progress() {
        let text = vm_table(&[vm()], false, now(), Style { color: false });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("NAME"));
        assert!(
            lines[1].contains("web-01  Protected  primary  Resynchronizing  Healthy  42s  Succeeded 2m0s ago  [##########----------]  50%  512 B/1.0 KiB"),
            "{text}"
        );
    }

    #[test]
    fn detail_draws_jobs_and_steps_as_a_tree_with_durations() {
        let text = vm_detail(&vm(), now(), Style { color: false });
        assert!(text.contains("Progress:"), "{text}");
        assert!(
            text.contains(
                "└─ web-01-failover-3  PlannedFailover  primary -> secondary  Succeeded  3s"
            ),
            "{text}"
        );
        assert!(text.contains("   ├─ ShutdownSource"), "{text}");
        assert!(text.contains("   └─ StartAtTarget"), "{text}");
        assert!(
            text.contains("   └─ StartAtTarget   Failed     2s  boom"),
            "{text}"
        );
    }

    #[test]
    fn colour_only_when_asked() {
        let plain = vm_detail(&vm(), now(), Style { color: false });
        let coloured = vm_detail(&vm(), now(), Style { color: true });
        assert!(!plain.contains('\x1b'));
        assert!(coloured.contains("\x1b[32mSucceeded\x1b[0m"));
        assert_eq!(strip_ansi(&coloured), plain);
    }

    #[test]
    fn durations_read_like_kubectl_ages() {
        assert_eq!(duration(0.25), "0s");
        assert_eq!(duration(42.0), "42s");
        assert_eq!(duration(250.0), "4m10s");
        assert_eq!(duration(7500.0), "2h5m");
        assert_eq!(duration(90000.0), "1d1h");
    }
}
