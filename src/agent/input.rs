//! Checks of everything a caller sends, made before any of it reaches the store: path
//! parameters, operation ids, ids and numbers in bodies. A refusal is a 400 naming what was
//! wrong.

use axum::extract::{FromRequestParts, Path, RawPathParams};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::{ApiError, ApiResult};
use crate::site::{
    AcceptReplication, CutRequest, DiskSpec, EnableReplication, FailoverRequest, OperationRequest,
    PowerRequest, TestFailoverRequest,
};

/// A VM or disk name: 1 to 63 characters of letters, digits, `.`, `_`, `-`, not starting with
/// `.` (it becomes a directory or file name under the data dir).
pub(super) fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !n.starts_with('.')
}

/// Operation ids (`operationId`, `?operationId=`, `cutId`): 1 to this many bytes. The
/// controller's ids embed object names of up to 253 characters.
pub const MAX_OP_ID: usize = 512;
/// Cycle ids (`{cycle}`, `cycleId`, `parent`, `inDoubt`): 1 to this many characters of
/// `[A-Za-z0-9._-]`, not starting with `.` (the agent's own are 34).
pub const MAX_CYCLE_ID: usize = 100;
/// Site names (`peerSite`, `sourceSite`) and networks: 1 to this many bytes.
pub const MAX_SITE_NAME: usize = 253;
/// `intervalSeconds` of `enable`: 1 second to a week.
pub const MAX_INTERVAL_SECONDS: u64 = 7 * 86400;
/// Hours of retention or app-consistent frequency: 0 to a year.
pub const MAX_HOURS: u64 = 24 * 365;
/// Bodies of the JSON routes.
pub const JSON_BODY_LIMIT: usize = 1 << 20;
/// Bodies of the guest write and block stream routes.
pub const DATA_BODY_LIMIT: usize = 256 << 20;
/// `{index}`, a disk's position: at most this many digits.
const MAX_INDEX_DIGITS: usize = 4;

/// The path parameters of a route, every one checked by its name before the handler runs
/// (`{vm}` and `{disk}` like a VM's name at creation, `{cycle}` like a cycle id, `{index}` as
/// a small number), then deserialized like `Path<T>`. Every handler takes its parameters
/// through this, so no name from a URL reaches the store (or a file path) unchecked.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let raw = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad(e.body_text()))?;
        for (name, value) in &raw {
            check_param(name, value)?;
        }
        let Path(t) = Path::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad(e.body_text()))?;
        Ok(Self(t))
    }
}

/// The namespace the controller acts for (the `twinsite-namespace` header), checked as a
/// Kubernetes namespace name: 1 to 63 of `a-z 0-9 -`, starting and ending with a letter or
/// digit. `None` when the header is absent (a call for no namespace).
pub struct Tenant(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let header = crate::site::NAMESPACE_HEADER;
        let Some(v) = parts.headers.get(header) else {
            return Ok(Self(None));
        };
        let v = v
            .to_str()
            .map_err(|_| ApiError::bad(format!("header {header} is not visible ASCII")))?;
        if !valid_namespace(v) {
            return Err(ApiError::bad(format!(
                "header {header} {} is not a namespace name (1 to 63 of a-z 0-9 -, starting \
                 and ending with a letter or digit)",
                shown(v)
            )));
        }
        Ok(Self(Some(v.to_string())))
    }
}

/// A Kubernetes namespace name (an RFC 1123 label).
pub fn valid_namespace(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-')
}

/// A value as a reason shows it: quoted, cut to 80 characters.
fn shown(v: &str) -> String {
    let mut s: String = v.chars().take(80).collect();
    if s.len() < v.len() {
        s.push('…');
    }
    format!("{s:?}")
}

fn check_param(name: &str, value: &str) -> ApiResult<()> {
    let (ok, rule) = match name {
        "vm" | "disk" => (
            valid_name(value),
            "1 to 63 characters of A-Z a-z 0-9 . _ -, not starting with '.'",
        ),
        "cycle" => (
            valid_cycle_id(value),
            "1 to 100 characters of A-Z a-z 0-9 . _ -, not starting with '.'",
        ),
        "index" => (
            !value.is_empty()
                && value.len() <= MAX_INDEX_DIGITS
                && value.bytes().all(|b| b.is_ascii_digit()),
            "a disk index: 1 to 4 digits",
        ),
        "site" => (
            !value.is_empty()
                && value.len() <= MAX_SITE_NAME
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "a site name: 1 to 253 characters of A-Z a-z 0-9 . _ -",
        ),
        // A route whose parameter has no rule here is refused rather than served unchecked.
        _ => {
            return Err(ApiError::new(
                super::ErrorKind::Internal,
                format!("path parameter {{{name}}} has no validation rule"),
            ));
        }
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "invalid {{{name}}} {}: {rule}",
            shown(value)
        )))
    }
}

pub fn valid_cycle_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CYCLE_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.')
}

/// A cycle id of a body (`cycleId`, `parent`, `inDoubt`).
pub fn cycle_id(field: &str, id: &str) -> ApiResult<()> {
    if valid_cycle_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "{field} {} must be 1 to {MAX_CYCLE_ID} characters of A-Z a-z 0-9 . _ -, not \
             starting with '.'",
            shown(id)
        )))
    }
}

/// An operation id (`operationId` of a body or of the query, `cutId`).
pub fn op_id(field: &str, id: &str) -> ApiResult<()> {
    if id.is_empty() || id.len() > MAX_OP_ID {
        return Err(ApiError::bad(format!(
            "{field} must be 1 to {MAX_OP_ID} bytes, got {}",
            id.len()
        )));
    }
    Ok(())
}

/// An optional operation id: checked when present.
pub fn opt_op_id(field: &str, id: Option<&str>) -> ApiResult<()> {
    id.map_or(Ok(()), |id| op_id(field, id))
}

/// A site name or a network: 1 to 253 bytes.
pub fn site_name(field: &str, v: &str) -> ApiResult<()> {
    if v.is_empty() || v.len() > MAX_SITE_NAME {
        return Err(ApiError::bad(format!(
            "{field} must be 1 to {MAX_SITE_NAME} bytes, got {}",
            v.len()
        )));
    }
    Ok(())
}

/// A number that must lie in `range`.
pub fn in_range(field: &str, v: u64, range: std::ops::RangeInclusive<u64>) -> ApiResult<()> {
    if range.contains(&v) {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "{field} must be between {} and {}, got {v}",
            range.start(),
            range.end()
        )))
    }
}

/// The disks of a VM to create: at least one, names valid and distinct, sizes from 1 byte to
/// `max_disk_bytes` (the agent's `--max-disk-bytes`).
pub fn disks(disks: &[DiskSpec], max_disk_bytes: u64) -> ApiResult<()> {
    if disks.is_empty() {
        return Err(ApiError::bad("a VM needs at least one disk"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for d in disks {
        if !valid_name(&d.name) || !seen.insert(d.name.as_str()) {
            return Err(ApiError::bad(format!(
                "invalid or repeated disk name {:?}",
                d.name
            )));
        }
        if d.size_bytes == 0 || d.size_bytes > max_disk_bytes {
            return Err(ApiError::bad(format!(
                "disk {} sizeBytes must be between 1 and {max_disk_bytes}",
                d.name
            )));
        }
    }
    Ok(())
}

/// The body of `replication/enable`.
pub fn enable(req: &EnableReplication) -> ApiResult<()> {
    op_id("operationId", &req.operation_id)?;
    site_name("peerSite", &req.peer_site)?;
    replication_numbers(
        req.interval_seconds,
        req.recovery_point_retention_hours,
        req.app_consistent_frequency_hours,
    )?;
    if !(req.peer_url.starts_with("http://") || req.peer_url.starts_with("https://")) {
        return Err(ApiError::bad("peerUrl must be an http(s) URL"));
    }
    Ok(())
}

/// The body of `replication/settings`.
pub fn settings(req: &crate::site::ReplicationSettingsRequest) -> ApiResult<()> {
    op_id("operationId", &req.operation_id)?;
    replication_numbers(
        req.interval_seconds,
        req.recovery_point_retention_hours,
        req.app_consistent_frequency_hours,
    )
}

/// The settings numbers of `enable` and `settings`.
fn replication_numbers(interval: u64, retention: u64, app_consistent: u64) -> ApiResult<()> {
    in_range("intervalSeconds", interval, 1..=MAX_INTERVAL_SECONDS)?;
    in_range("recoveryPointRetentionHours", retention, 0..=MAX_HOURS)?;
    in_range("appConsistentFrequencyHours", app_consistent, 0..=MAX_HOURS)
}

/// The body of `replication/accept`.
pub fn accept(req: &AcceptReplication) -> ApiResult<()> {
    op_id("operationId", &req.operation_id)?;
    site_name("sourceSite", &req.source_site)
}

/// The body of `power`.
pub fn power(req: &PowerRequest) -> ApiResult<()> {
    opt_op_id("operationId", req.operation_id.as_deref())
}

/// A body that carries only an operation id (sync, stop, commit, test-failover cleanup...).
pub fn operation(req: &OperationRequest) -> ApiResult<()> {
    op_id("operationId", &req.operation_id)
}

/// The body of `failover` (a recovery point id that names no point is the store's 404).
pub fn failover(req: &FailoverRequest) -> ApiResult<()> {
    op_id("operationId", &req.operation_id)?;
    network_mappings(&req.network_mappings)
}

/// The most network mappings a failover carries (a Site holds at most as many).
pub const MAX_NETWORK_MAPPINGS: usize = 64;

/// Network mappings: libvirt network names (as VM names), each `from` once.
fn network_mappings(maps: &[crate::site::NetworkMap]) -> ApiResult<()> {
    if maps.len() > MAX_NETWORK_MAPPINGS {
        return Err(ApiError::bad(format!(
            "networkMappings holds {} mappings, at most {MAX_NETWORK_MAPPINGS} are allowed",
            maps.len()
        )));
    }
    for (i, m) in maps.iter().enumerate() {
        for (field, name) in [("from", &m.from), ("to", &m.to)] {
            if !valid_name(name) {
                return Err(ApiError::bad(format!(
                    "networkMappings[{i}].{field} {name:?} is not a network name (1 to 63 of \
                     letters, digits, '-', '_' and '.', not starting with '.')"
                )));
            }
        }
        if maps[..i].iter().any(|o| o.from == m.from) {
            return Err(ApiError::bad(format!(
                "networkMappings maps network {:?} twice",
                m.from
            )));
        }
    }
    Ok(())
}

/// The body of `test-failover`.
pub fn test_failover(req: &TestFailoverRequest) -> ApiResult<()> {
    op_id("operationId", &req.operation_id)?;
    site_name("network", &req.network)
}

/// The body of `POST /v1/cuts`.
pub fn cut(req: &CutRequest) -> ApiResult<()> {
    op_id("cutId", &req.cut_id)?;
    if let Some(bad) = req.vms.iter().find(|n| !valid_name(n)) {
        return Err(ApiError::bad(format!("invalid VM name {bad:?} in vms")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_checked_by_name() {
        for (name, value) in [
            ("vm", "web-01"),
            ("disk", "disk0"),
            ("cycle", "c18f-00ab"),
            ("index", "12"),
        ] {
            assert!(check_param(name, value).is_ok(), "{name} {value}");
        }
        let long = "a".repeat(64);
        for (name, value) in [
            ("vm", ".."),
            ("vm", "a/b"),
            ("vm", long.as_str()),
            ("disk", ".x"),
            ("cycle", "../x"),
            ("index", "-1"),
            ("index", "12345"),
        ] {
            let e = check_param(name, value).unwrap_err();
            assert_eq!(e.kind, super::super::ErrorKind::BadRequest);
            assert!(e.message.contains(&format!("{{{name}}}")), "{}", e.message);
        }
        assert_eq!(
            check_param("other", "x").unwrap_err().kind,
            super::super::ErrorKind::Internal
        );
    }

    #[test]
    fn network_mappings_are_names_each_mapped_once() {
        let map = |from: &str, to: &str| crate::site::NetworkMap {
            from: from.into(),
            to: to.into(),
        };
        let req = |maps| FailoverRequest {
            operation_id: "op".into(),
            recovery_point: crate::site::RecoveryPointSelector::Latest,
            network_mappings: maps,
        };
        assert!(failover(&req(vec![map("prod-a", "prod-b"), map("lan", "lan2")])).is_ok());
        for (maps, says) in [
            (vec![map("prod-a", "a/b")], "networkMappings[0].to"),
            (vec![map("", "x")], "networkMappings[0].from"),
            (vec![map("a", "b"), map("a", "c")], "twice"),
            (
                (0..=MAX_NETWORK_MAPPINGS)
                    .map(|i| map(&format!("n{i}"), "x"))
                    .collect(),
                "at most",
            ),
        ] {
            let e = failover(&req(maps)).unwrap_err();
            assert!(e.message.contains(says), "{}", e.message);
        }
    }
}

/// Property tests of the agent's JSON bodies (see `crate::fuzz`): arbitrary, damaged and
/// made-up bodies of every request type never panic the parser or the checks, and a body that
/// parses is refused exactly when a value is out of its range.
#[cfg(test)]
mod fuzz {
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::{Index, select};
    use serde::de::DeserializeOwned;
    use serde_json::{Map, Value, json};

    use super::*;
    use crate::agent::ErrorKind;
    use crate::agent::replica::{BeginCycle, CommitCycle, MAX_DEFINITION_BYTES};
    use crate::site::CreateVm;

    /// The largest disk in these checks (the agent's `--max-disk-bytes`).
    const MAX_DISK: u64 = 1 << 40;

    // The rules as docs/agent.md states them, written apart from the checks they test.
    fn op_ok(s: &str) -> bool {
        (1..=512).contains(&s.len())
    }
    fn site_ok(s: &str) -> bool {
        (1..=253).contains(&s.len())
    }
    fn id_chars_ok(s: &str, max: usize) -> bool {
        (1..=max).contains(&s.len())
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    }
    fn name_ok(s: &str) -> bool {
        id_chars_ok(s, 63)
    }
    fn cycle_ok(s: &str) -> bool {
        id_chars_ok(s, 100)
    }
    fn disks_ok(d: &[DiskSpec]) -> bool {
        let names: std::collections::HashSet<_> = d.iter().map(|d| &d.name).collect();
        !d.is_empty()
            && names.len() == d.len()
            && d.iter()
                .all(|d| name_ok(&d.name) && (1..=MAX_DISK).contains(&d.size_bytes))
    }

    thread_local! {
        /// Per request type: bodies that parsed and were accepted, and that were refused.
        static SEEN: std::cell::RefCell<std::collections::BTreeMap<&'static str, (u64, u64)>> =
            Default::default();
    }

    /// Parses `body` as a `T`; when it parses, the check must refuse it (a 400) exactly when
    /// the rules say so.
    fn one<T: DeserializeOwned>(
        what: &'static str,
        body: &[u8],
        check: impl Fn(&T) -> ApiResult<()>,
        rules: impl Fn(&T) -> bool,
    ) -> Result<(), TestCaseError> {
        let Ok(req) = serde_json::from_slice::<T>(body) else {
            return Ok(());
        };
        let got = check(&req);
        let want = rules(&req);
        SEEN.with(|m| {
            let mut m = m.borrow_mut();
            let e = m.entry(what).or_default();
            if got.is_ok() {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        });
        prop_assert_eq!(
            got.is_ok(),
            want,
            "{}: check says {:?}, the rules say {}",
            what,
            got.as_ref().err().map(|e| &e.message),
            want
        );
        if let Err(e) = got {
            prop_assert_eq!(e.kind, ErrorKind::BadRequest);
        }
        Ok(())
    }

    /// `body` as every request type of the agent.
    fn every_type(body: &[u8]) -> Result<(), TestCaseError> {
        one::<EnableReplication>("enable", body, enable, |r| {
            op_ok(&r.operation_id)
                && site_ok(&r.peer_site)
                && (1..=MAX_INTERVAL_SECONDS).contains(&r.interval_seconds)
                && r.recovery_point_retention_hours <= MAX_HOURS
                && r.app_consistent_frequency_hours <= MAX_HOURS
                && (r.peer_url.starts_with("http://") || r.peer_url.starts_with("https://"))
        })?;
        one::<crate::site::ReplicationSettingsRequest>("settings", body, settings, |r| {
            op_ok(&r.operation_id)
                && (1..=MAX_INTERVAL_SECONDS).contains(&r.interval_seconds)
                && r.recovery_point_retention_hours <= MAX_HOURS
                && r.app_consistent_frequency_hours <= MAX_HOURS
        })?;
        one::<AcceptReplication>("accept", body, accept, |r| {
            op_ok(&r.operation_id) && site_ok(&r.source_site)
        })?;
        one::<PowerRequest>("power", body, power, |r| {
            r.operation_id.as_deref().is_none_or(op_ok)
        })?;
        one::<OperationRequest>("operation", body, operation, |r| op_ok(&r.operation_id))?;
        one::<FailoverRequest>("failover", body, failover, |r| {
            let maps = &r.network_mappings;
            op_ok(&r.operation_id)
                && maps.len() <= MAX_NETWORK_MAPPINGS
                && maps.iter().all(|m| name_ok(&m.from) && name_ok(&m.to))
                && maps
                    .iter()
                    .enumerate()
                    .all(|(i, m)| maps[..i].iter().all(|o| o.from != m.from))
        })?;
        one::<TestFailoverRequest>("test-failover", body, test_failover, |r| {
            op_ok(&r.operation_id) && site_ok(&r.network)
        })?;
        one::<CutRequest>("cut", body, cut, |r| {
            op_ok(&r.cut_id) && r.vms.iter().all(|v| name_ok(v))
        })?;
        one::<CreateVm>(
            "create",
            body,
            |r| disks(&r.disks, MAX_DISK),
            |r| disks_ok(&r.disks),
        )?;
        one::<BeginCycle>(
            "begin",
            body,
            |r| r.check().and_then(|()| disks(&r.disks, MAX_DISK)),
            |r| {
                site_ok(&r.source_site)
                    && cycle_ok(&r.cycle_id)
                    && r.parent.as_deref().is_none_or(cycle_ok)
                    && r.in_doubt.as_deref().is_none_or(cycle_ok)
                    && r.in_doubt_earlier.len() <= 8
                    && r.in_doubt_earlier.iter().all(|c| cycle_ok(c))
                    && r.definition
                        .as_ref()
                        .is_none_or(|d| d.len() <= MAX_DEFINITION_BYTES)
                    && r.retention_hours <= MAX_HOURS
                    && disks_ok(&r.disks)
            },
        )?;
        one::<CommitCycle>("commit", body, CommitCycle::check, |r| {
            cycle_ok(&r.cycle_id) && r.cut_id.as_deref().is_none_or(op_ok)
        })
    }

    /// Mostly a `u64` (in range, at the edges, anywhere), sometimes anything else.
    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => (0u64..=10).prop_map(Value::from),
            4 => select(vec![
                MAX_INTERVAL_SECONDS,
                MAX_INTERVAL_SECONDS + 1,
                MAX_HOURS,
                MAX_HOURS + 1,
                MAX_DISK,
                MAX_DISK + 1,
                u64::MAX,
            ])
            .prop_map(Value::from),
            2 => any::<u64>().prop_map(Value::from),
            1 => prop_oneof![
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(|f| json!(f)),
                Just(json!("12")),
                Just(json!(1e30)),
                Just(Value::Null),
                Just(json!(true)),
            ],
        ]
    }

    /// Mostly a string (ids, names, edges of the length limits, any Unicode), sometimes not.
    fn text() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => "[a-zA-Z0-9._-]{0,12}".prop_map(Value::from),
            3 => (select(vec![0usize, 1, 63, 64, 100, 101, 253, 254, 512, 513]), "[a-z.]")
                .prop_map(|(n, c)| Value::from(c.repeat(n))),
            2 => any::<String>().prop_map(Value::from),
            2 => select(vec![
                ".hidden",
                "../etc",
                "a/b",
                "rp-000001",
                "Latest",
                "http://peer:7101",
                "https://peer",
                "ftp://peer",
            ])
            .prop_map(Value::from),
            1 => prop_oneof![Just(Value::Null), (0u64..5).prop_map(Value::from)],
        ]
    }

    /// One of `words` mostly, sometimes another string or value.
    fn word(words: &'static [&'static str]) -> impl Strategy<Value = Value> {
        prop_oneof![
            6 => select(words).prop_map(Value::from),
            1 => text(),
        ]
    }

    fn flag() -> impl Strategy<Value = Value> {
        prop_oneof![6 => any::<bool>().prop_map(Value::from), 1 => text()]
    }

    fn disk_list() -> impl Strategy<Value = Value> {
        prop_oneof![
            6 => vec(
                (text(), number()).prop_map(|(n, s)| json!({"name": n, "sizeBytes": s})),
                0..4
            )
            .prop_map(Value::from),
            1 => text(),
        ]
    }

    /// A body every request type accepts: the fields of all of them, each valid.
    fn valid() -> Value {
        json!({
            "operationId": "op-1", "peerSite": "secondary", "peerUrl": "https://peer:7101",
            "peerToken": "t", "intervalSeconds": 300, "recoveryPointRetentionHours": 24,
            "appConsistentFrequencyHours": 4, "mode": "Initial", "sourceSite": "primary",
            "network": "isolated", "recoveryPoint": "Latest", "cutId": "cut-1",
            "vms": ["web-01"], "disks": [{"name": "disk0", "sizeBytes": 1048576}],
            "integrationServices": true, "retentionHours": 24, "cycleId": "c-1",
            "parent": "c-0", "definition": "<domain/>", "bulk": false, "zero": false,
            "inDoubt": "c-0", "inDoubtEarlier": ["c-00"], "time": "2026-11-30T04:00:00Z", "kind": "CrashConsistent",
            "action": "Start", "power": "Running",
        })
    }

    /// [`valid`] with a few fields changed (to values in range, at the edges, beyond them,
    /// of another type) or left out: every type parses the fields it knows (unknown ones are
    /// ignored).
    fn body() -> impl Strategy<Value = Value> {
        let field = |k: &'static str, v: BoxedStrategy<Value>| {
            proptest::option::weighted(0.9, v).prop_map(move |v| (k, v))
        };
        let definition = prop_oneof![
            text(),
            select(vec![MAX_DEFINITION_BYTES, MAX_DEFINITION_BYTES + 1])
                .prop_map(|n| Value::from("x".repeat(n)))
        ];
        let vms = prop_oneof![6 => vec(text(), 0..4).prop_map(Value::from), 1 => text()];
        let cycles = prop_oneof![6 => vec(text(), 0..10).prop_map(Value::from), 1 => text()];
        vec(
            prop_oneof![
                field("operationId", text().boxed()),
                field("peerSite", text().boxed()),
                field("peerUrl", text().boxed()),
                field("peerToken", text().boxed()),
                field("intervalSeconds", number().boxed()),
                field("recoveryPointRetentionHours", number().boxed()),
                field("appConsistentFrequencyHours", number().boxed()),
                field("mode", word(&["Initial", "Resync"]).boxed()),
                field("sourceSite", text().boxed()),
                field("network", text().boxed()),
                field("recoveryPoint", text().boxed()),
                field("cutId", text().boxed()),
                field("vms", vms.boxed()),
                field("disks", disk_list().boxed()),
                field("integrationServices", flag().boxed()),
                field("retentionHours", number().boxed()),
                field("cycleId", text().boxed()),
                field("parent", text().boxed()),
                field("definition", definition.boxed()),
                field("bulk", flag().boxed()),
                field("zero", flag().boxed()),
                field("inDoubt", text().boxed()),
                field("inDoubtEarlier", cycles.boxed()),
                field(
                    "time",
                    word(&["2026-11-30T04:00:00Z", "1970-01-01T00:00:00Z"]).boxed()
                ),
                field(
                    "kind",
                    word(&["CrashConsistent", "AppConsistent", "Hourly"]).boxed()
                ),
                field("action", word(&["Start", "Shutdown", "PowerOff"]).boxed()),
                field("power", word(&["Running", "Off"]).boxed()),
            ],
            0..5,
        )
        .prop_map(|changes| {
            let mut v = valid();
            let m: &mut Map<String, Value> = v.as_object_mut().expect("an object");
            for (k, new) in changes {
                match new {
                    Some(new) => m.insert(k.to_string(), new),
                    None => m.remove(k),
                };
            }
            v
        })
    }

    #[test]
    fn fuzz_agent_json_bodies() {
        crate::fuzz::run("agent JSON bodies", body(), |v| {
            every_type(&serde_json::to_vec(&v).expect("a JSON value serializes"))
        });
        // The made-up bodies reach both answers of every type's check.
        let seen = SEEN.with(|m| m.borrow().clone());
        println!("parsed bodies (accepted, refused): {seen:?}");
        for what in [
            "enable",
            "settings",
            "accept",
            "power",
            "operation",
            "failover",
            "test-failover",
            "cut",
            "create",
            "begin",
            "commit",
        ] {
            let (ok, refused) = seen.get(what).copied().unwrap_or_default();
            assert!(
                ok > 0 && refused > 0,
                "{what}: {ok} accepted, {refused} refused"
            );
        }
    }

    #[test]
    fn fuzz_damaged_agent_json_bodies() {
        crate::fuzz::run(
            "damaged agent JSON bodies",
            (body(), vec((any::<Index>(), any::<u8>(), 0..3u8), 1..4)),
            |(v, damage)| {
                let mut b = serde_json::to_vec(&v).expect("a JSON value serializes");
                for (i, byte, how) in damage {
                    let at = i.index(b.len() + 1);
                    match how {
                        0 if at < b.len() => b[at] = byte,
                        1 => b.insert(at, byte),
                        _ => b.truncate(at),
                    }
                }
                every_type(&b)
            },
        );
    }

    #[test]
    fn fuzz_arbitrary_bytes_as_agent_json_bodies() {
        crate::fuzz::run(
            "arbitrary bytes as agent JSON bodies",
            prop_oneof![
                vec(any::<u8>(), 0..200),
                "\\{(\"[a-zA-Z]{1,20}\":[0-9a-z\"\\[\\]{},:.-]{0,20},?){0,6}\\}"
                    .prop_map(String::into_bytes),
            ],
            |b| every_type(&b),
        );
    }
}
