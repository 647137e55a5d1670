//! Which recovery points to keep: a pure planner.
//!
//! - The newest point and the newest app-consistent point are always kept.
//! - With `retention_hours == 0` nothing else is kept.
//! - Otherwise every point of the last hour is kept (short-term points, so a fresh problem can
//!   be rolled back minutes), and for older points up to `retention_hours` back the newest point
//!   of each clock hour is kept as an `Hourly` point, as are app-consistent points.
//! - Everything else is merged into its successor.

use std::collections::BTreeSet;

use jiff::Timestamp;

use crate::site::RecoveryPointKind;

/// What the planner needs to know of a point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointInfo {
    pub seq: u64,
    pub time: Timestamp,
    pub kind: RecoveryPointKind,
}

/// What to do with the points.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Points to merge away.
    pub delete: Vec<u64>,
    /// Kept crash-consistent points that become the hour's `Hourly` point.
    pub relabel_hourly: Vec<u64>,
}

pub fn plan(points: &[PointInfo], now: Timestamp, retention_hours: u64) -> Plan {
    let mut keep = BTreeSet::new();
    let mut hourly = Vec::new();
    if let Some(newest) = points.iter().max_by_key(|p| p.seq) {
        keep.insert(newest.seq);
    }
    if let Some(ac) = points
        .iter()
        .filter(|p| p.kind == RecoveryPointKind::AppConsistent)
        .max_by_key(|p| p.seq)
    {
        keep.insert(ac.seq);
    }
    if retention_hours > 0 {
        let now_s = now.as_second();
        let window = retention_hours as i64 * 3600;
        let mut newest_of_hour: std::collections::BTreeMap<i64, &PointInfo> = Default::default();
        for p in points {
            let age = now_s - p.time.as_second();
            if age < 3600 {
                keep.insert(p.seq);
            } else if age <= window {
                if p.kind == RecoveryPointKind::AppConsistent {
                    keep.insert(p.seq);
                }
                let hour = p.time.as_second().div_euclid(3600);
                let e = newest_of_hour.entry(hour).or_insert(p);
                if p.seq > e.seq {
                    *e = p;
                }
            }
        }
        for p in newest_of_hour.values() {
            keep.insert(p.seq);
            if p.kind == RecoveryPointKind::CrashConsistent {
                hourly.push(p.seq);
            }
        }
    }
    Plan {
        delete: points
            .iter()
            .map(|p| p.seq)
            .filter(|s| !keep.contains(s))
            .collect(),
        relabel_hourly: hourly,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(seq: u64, mins_ago: i64, kind: RecoveryPointKind) -> PointInfo {
        PointInfo {
            seq,
            time: Timestamp::from_second(1_000_000 * 3600 - mins_ago * 60).unwrap(),
            kind,
        }
    }

    #[test]
    fn keeps_recent_hourly_and_app_consistent() {
        use RecoveryPointKind::*;
        let now = Timestamp::from_second(1_000_000 * 3600).unwrap();
        let pts = vec![
            p(1, 300, CrashConsistent), // 5h ago: beyond a 4h window
            p(2, 150, CrashConsistent), // hour -3
            p(3, 140, CrashConsistent), // hour -3, newer: hourly
            p(4, 100, AppConsistent),   // hour -2
            p(5, 90, CrashConsistent),  // hour -2, newest of hour: hourly
            p(6, 30, CrashConsistent),  // last hour
            p(7, 1, CrashConsistent),   // newest
        ];
        let plan4 = plan(&pts, now, 4);
        assert_eq!(plan4.delete, vec![1, 2]);
        assert_eq!(plan4.relabel_hourly, vec![3, 5]);
        let plan0 = plan(&pts, now, 0);
        assert_eq!(plan0.delete, vec![1, 2, 3, 5, 6]);
        assert!(plan0.relabel_hourly.is_empty());
    }
}
