//! What the reconcilers write to the API server, in one place: status as a JSON merge patch of
//! the fields that changed (guarded by the resourceVersion the decision was made from), and
//! Events.

use std::fmt::Debug;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tracing::{info, warn};

pub use super::notes::Note;

/// What [`write_status`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusWrite {
    /// The object's resourceVersion after the write (the one given when nothing was written).
    pub resource_version: Option<String>,
    /// Whether a patch went to the API server.
    pub written: bool,
}

/// Merge-patches the fields of status that differ between `old` and `new` ([`diff`]), with the
/// resourceVersion `rv` the decision was made from: a writer that moved the object on
/// meanwhile makes this fail (409) instead of being overwritten, so a job or a step is never
/// started twice. Nothing changed, nothing written.
pub async fn write_status<K, S, E>(
    api: &Api<K>,
    name: &str,
    old: &S,
    new: &S,
    rv: Option<&str>,
) -> Result<StatusWrite, E>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    S: Serialize,
    E: From<kube::Error> + From<serde_json::Error>,
{
    let changed = diff(&serde_json::to_value(old)?, &serde_json::to_value(new)?);
    if changed.is_empty() {
        return Ok(StatusWrite {
            resource_version: rv.map(str::to_string),
            written: false,
        });
    }
    let mut patch = json!({ "status": Value::Object(changed) });
    if let Some(rv) = rv {
        patch["metadata"] = json!({ "resourceVersion": rv });
    }
    let out = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(StatusWrite {
        resource_version: out.resource_version(),
        written: true,
    })
}

/// The JSON merge patch (RFC 7386) from `old` to `new`: the fields of `new` that differ from
/// `old`, an object that is in both as its own patch, and removed fields as null. A merge patch
/// merges nested objects, so a nested field that became unset must be sent as null too (or
/// the API server keeps its old value).
pub fn diff(old: &Value, new: &Value) -> Map<String, Value> {
    let empty = Map::new();
    let o = old.as_object().unwrap_or(&empty);
    let n = new.as_object().unwrap_or(&empty);
    let mut out = Map::new();
    for (k, v) in n {
        match o.get(k) {
            Some(ov) if ov == v => {}
            Some(ov) if ov.is_object() && v.is_object() => {
                out.insert(k.clone(), Value::Object(diff(ov, v)));
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    for k in o.keys() {
        if !n.contains_key(k) {
            out.insert(k.clone(), Value::Null);
        }
    }
    out
}

/// Publishes `notes` as Events about `regarding`, in order. A failure is logged, never
/// returned: an Event is not worth failing a reconcile for.
pub async fn publish(recorder: &Recorder, regarding: &ObjectReference, notes: &[Note]) {
    for n in notes {
        // Every job start and end is an Event; the same line in the log follows a failover
        // without kubectl.
        let (kind, name) = (
            regarding.kind.as_deref().unwrap_or_default(),
            regarding.name.as_deref().unwrap_or_default(),
        );
        if n.warning {
            warn!(kind, name, subject = %n.subject, reason = %n.reason, "{}", n.message);
        } else {
            info!(kind, name, subject = %n.subject, reason = %n.reason, "{}", n.message);
        }
        let mut about = regarding.clone();
        about.field_path = Some(n.subject.chars().take(256).collect());
        let ev = Event {
            type_: if n.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: n.reason.to_string(),
            note: Some(n.message.chars().take(1000).collect()),
            action: n.action.to_string(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &about).await {
            warn!(
                kind = regarding.kind.as_deref().unwrap_or_default(),
                name = regarding.name.as_deref().unwrap_or_default(),
                error = %e,
                "publishing an event failed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::diff;
    use serde_json::json;

    #[test]
    fn diff_keeps_only_changed_top_level_fields() {
        let old = json!({"phase": "Protected", "jobs": [1], "testFailover": {"a": 1}});
        let new = json!({"phase": "Protected", "jobs": [1, 2], "activeSite": "b"});
        let d = diff(&old, &new);
        assert_eq!(
            serde_json::Value::Object(d),
            json!({"jobs": [1, 2], "activeSite": "b", "testFailover": null})
        );
        assert!(diff(&new, &new).is_empty());
    }

    /// RFC 7386: what the API server makes of a merge patch.
    fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        let Some(p) = patch.as_object() else {
            *target = patch.clone();
            return;
        };
        if !target.is_object() {
            *target = json!({});
        }
        if let Some(t) = target.as_object_mut() {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
        }
    }

    #[test]
    fn nested_fields_that_become_unset_are_removed_by_the_patch() {
        let old = json!({
            "phase": "Protected",
            "replication": {"state": "Replicating", "sourceSite": "a", "targetSite": "b",
                            "health": "Healthy", "rpoSeconds": 12, "lastSyncTime": "t"},
            "recoveryPoints": {"count": 3, "latest": {"id": "rp-3"}},
        });
        let new = json!({
            "phase": "Failed",
            "replication": {"state": "Disabled"},
            "recoveryPoints": {"count": 3, "latest": {"id": "rp-4", "time": "u"}},
        });
        let mut patched = old.clone();
        merge(&mut patched, &serde_json::Value::Object(diff(&old, &new)));
        assert_eq!(patched, new);
        let mut back = new.clone();
        merge(&mut back, &serde_json::Value::Object(diff(&new, &old)));
        assert_eq!(back, old);
    }
}
