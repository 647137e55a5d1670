//! Checks of everything a caller sends, made before any of it reaches the store: path
//! parameters, operation ids, ids and numbers in bodies. A refusal is a 400 naming what was
//! wrong.

use axum::extract::{FromRequestParts, Path, RawPathParams};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::{ApiError, ApiResult};

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
}
