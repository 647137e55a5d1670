//! The controller's side of the site seam: what it asks of a site, and an HTTP client of the
//! site agent API (docs/agent-api.md).
//!
//! This mirrors the provider trait that `crate::site` is to hold; until that lands the
//! controller carries its own, with the same names, so switching is a change of `use` lines.

use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Errors a site call can end in, split by what the caller does about them.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("site unreachable: {0}")]
    Unreachable(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("site error {0}: {1}")]
    Other(u16, String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Power {
    Running,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Replica,
    TestCopy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationState {
    #[default]
    Disabled,
    InitialReplication,
    Replicating,
    Resynchronizing,
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    Outbound,
    Inbound,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationInfo {
    #[serde(default)]
    pub state: ReplicationState,
    #[serde(default)]
    pub direction: Option<Direction>,
    #[serde(default)]
    pub peer_site: Option<String>,
    #[serde(default)]
    pub last_sync_time: Option<Timestamp>,
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPoint {
    pub id: String,
    pub time: Timestamp,
    #[serde(default)]
    pub app_consistent: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPointsSummary {
    #[serde(default)]
    pub count: u64,
    #[serde(default)]
    pub latest: Option<RecoveryPoint>,
    #[serde(default)]
    pub latest_app_consistent: Option<RecoveryPoint>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestCopyInfo {
    pub vm_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskSpec {
    pub name: String,
    pub size_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vm {
    pub name: String,
    pub power: Power,
    pub role: Role,
    #[serde(default)]
    pub integration_services: bool,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub replication: ReplicationInfo,
    #[serde(default)]
    pub recovery_points: RecoveryPointsSummary,
    #[serde(default)]
    pub test_copy: Option<TestCopyInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmList {
    #[serde(default)]
    pub vms: Vec<Vm>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateVm {
    pub disks: Vec<DiskSpec>,
    pub power: Power,
    pub integration_services: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PowerAction {
    Start,
    Shutdown,
    PowerOff,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationMode {
    #[default]
    Initial,
    Resync,
}

/// Body of `replication/enable`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnableReplication {
    pub operation_id: String,
    pub peer_site: String,
    pub peer_url: String,
    pub peer_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_ca_pem: Option<String>,
    pub interval_seconds: u64,
    pub recovery_point_retention_hours: u64,
    pub app_consistent_frequency_hours: u64,
    pub mode: ReplicationMode,
}

/// `Latest`, `LatestProcessed`, `LatestAppConsistent` or a recovery point id, as on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryPointSelector(pub String);

impl From<String> for RecoveryPointSelector {
    fn from(s: String) -> Self {
        Self(s)
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncResult {
    pub recovery_point: RecoveryPoint,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverResult {
    pub recovery_point: RecoveryPoint,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestFailoverResult {
    pub vm_name: String,
    pub recovery_point: RecoveryPoint,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitResult {
    #[serde(default)]
    pub deleted_recovery_points: u64,
}

pub type SiteFuture<'a, T> = BoxFuture<'a, Result<T, SiteError>>;

/// One site as the controller sees it. Mutating calls carry an operation id: a repeated call
/// with the same id returns the first call's result and does the work once.
pub trait SiteProvider: Send + Sync {
    fn health(&self) -> SiteFuture<'_, ()>;
    fn list_vms(&self) -> SiteFuture<'_, VmList>;
    fn get_vm<'a>(&'a self, vm: &'a str) -> SiteFuture<'a, Vm>;
    fn create_vm<'a>(&'a self, vm: &'a str, spec: &'a CreateVm) -> SiteFuture<'a, Vm>;
    fn delete_vm<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, ()>;
    fn power<'a>(&'a self, vm: &'a str, action: PowerAction, op_id: &'a str) -> SiteFuture<'a, ()>;
    fn enable_replication<'a>(
        &'a self,
        vm: &'a str,
        params: &'a EnableReplication,
    ) -> SiteFuture<'a, ()>;
    fn sync<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, SyncResult>;
    fn stop_replication<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, ()>;
    fn failover<'a>(
        &'a self,
        vm: &'a str,
        rp: &'a RecoveryPointSelector,
        op_id: &'a str,
    ) -> SiteFuture<'a, FailoverResult>;
    fn test_failover<'a>(
        &'a self,
        vm: &'a str,
        rp: &'a RecoveryPointSelector,
        network: &'a str,
        op_id: &'a str,
    ) -> SiteFuture<'a, TestFailoverResult>;
    fn test_failover_cleanup<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, ()>;
    fn commit<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, CommitResult>;
    fn digest<'a>(&'a self, vm: &'a str, disk: &'a str) -> SiteFuture<'a, String>;
}

/// Quick calls; sync and failover may move whole disks and get longer.
const SHORT: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(1800);

/// A [`SiteProvider`] speaking the site agent's HTTP API with a bearer token.
#[derive(Clone, Debug)]
pub struct AgentClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl AgentClient {
    /// `ca_pem`: the CA of an https agent. Call [`crate::init_crypto`] first.
    pub fn new(url: &str, token: &str, ca_pem: Option<&[u8]>) -> Result<Self, SiteError> {
        let mut b = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| SiteError::BadRequest(format!("CA PEM: {e}")))?;
            b = b.tls_certs_only(certs);
        }
        let http = b
            .build()
            .map_err(|e| SiteError::Other(0, format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
        })
    }

    fn req(&self, m: Method, path: &str, timeout: Duration) -> reqwest::RequestBuilder {
        self.http
            .request(m, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .timeout(timeout)
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<reqwest::Response, SiteError> {
        let resp = r
            .send()
            .await
            .map_err(|e| SiteError::Unreachable(chain(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_string))
            .unwrap_or(body);
        Err(match status {
            StatusCode::UNAUTHORIZED => SiteError::Unauthorized(msg),
            StatusCode::NOT_FOUND => SiteError::NotFound(msg),
            StatusCode::CONFLICT => SiteError::Conflict(msg),
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
                SiteError::BadRequest(msg)
            }
            s => SiteError::Other(s.as_u16(), msg),
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        m: Method,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<T, SiteError> {
        let mut r = self.req(m, path, timeout);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = self.send(r).await?;
        let code = resp.status().as_u16();
        resp.json::<T>()
            .await
            .map_err(|e| SiteError::Other(code, format!("decoding answer: {e}")))
    }

    async fn unit(
        &self,
        m: Method,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<(), SiteError> {
        let mut r = self.req(m, path, timeout);
        if let Some(b) = body {
            r = r.json(&b);
        }
        self.send(r).await.map(|_| ())
    }

    /// Guest write at `offset`; durable at the site when it returns.
    pub async fn write_disk(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), SiteError> {
        let path = format!(
            "/v1/vms/{}/disks/{}/data?offset={offset}",
            enc(vm),
            enc(disk)
        );
        self.send(self.req(Method::PUT, &path, LONG).body(data))
            .await
            .map(|_| ())
    }

    /// Guest read of `length` bytes at `offset`.
    pub async fn read_disk(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, SiteError> {
        let path = format!(
            "/v1/vms/{}/disks/{}/data?offset={offset}&length={length}",
            enc(vm),
            enc(disk)
        );
        let resp = self.send(self.req(Method::GET, &path, LONG)).await?;
        resp.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| SiteError::Unreachable(chain(&e)))
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn vm_path(vm: &str, rest: &str) -> String {
    format!("/v1/vms/{}{rest}", enc(vm))
}

impl SiteProvider for AgentClient {
    fn health(&self) -> SiteFuture<'_, ()> {
        Box::pin(async move {
            self.send(
                self.http
                    .get(format!("{}/healthz", self.base))
                    .timeout(SHORT),
            )
            .await
            .map(|_| ())
        })
    }

    fn list_vms(&self) -> SiteFuture<'_, VmList> {
        Box::pin(self.json(Method::GET, "/v1/vms", None, SHORT))
    }

    fn get_vm<'a>(&'a self, vm: &'a str) -> SiteFuture<'a, Vm> {
        Box::pin(async move { self.json(Method::GET, &vm_path(vm, ""), None, SHORT).await })
    }

    fn create_vm<'a>(&'a self, vm: &'a str, spec: &'a CreateVm) -> SiteFuture<'a, Vm> {
        Box::pin(async move {
            let body =
                serde_json::to_value(spec).map_err(|e| SiteError::BadRequest(e.to_string()))?;
            self.json(Method::PUT, &vm_path(vm, ""), Some(body), LONG)
                .await
        })
    }

    fn delete_vm<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, ()> {
        Box::pin(async move {
            let path = vm_path(vm, &format!("?operationId={}", enc(op_id)));
            self.unit(Method::DELETE, &path, None, LONG).await
        })
    }

    fn power<'a>(&'a self, vm: &'a str, action: PowerAction, op_id: &'a str) -> SiteFuture<'a, ()> {
        Box::pin(async move {
            let body = json!({"action": action, "operationId": op_id});
            self.unit(Method::POST, &vm_path(vm, "/power"), Some(body), LONG)
                .await
        })
    }

    fn enable_replication<'a>(
        &'a self,
        vm: &'a str,
        params: &'a EnableReplication,
    ) -> SiteFuture<'a, ()> {
        Box::pin(async move {
            let body =
                serde_json::to_value(params).map_err(|e| SiteError::BadRequest(e.to_string()))?;
            self.unit(
                Method::POST,
                &vm_path(vm, "/replication/enable"),
                Some(body),
                SHORT,
            )
            .await
        })
    }

    fn sync<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, SyncResult> {
        Box::pin(async move {
            let body = json!({"operationId": op_id});
            self.json(
                Method::POST,
                &vm_path(vm, "/replication/sync"),
                Some(body),
                LONG,
            )
            .await
        })
    }

    fn stop_replication<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, ()> {
        Box::pin(async move {
            let body = json!({"operationId": op_id});
            self.unit(
                Method::POST,
                &vm_path(vm, "/replication/stop"),
                Some(body),
                SHORT,
            )
            .await
        })
    }

    fn failover<'a>(
        &'a self,
        vm: &'a str,
        rp: &'a RecoveryPointSelector,
        op_id: &'a str,
    ) -> SiteFuture<'a, FailoverResult> {
        Box::pin(async move {
            let body = json!({"operationId": op_id, "recoveryPoint": rp.0});
            self.json(Method::POST, &vm_path(vm, "/failover"), Some(body), LONG)
                .await
        })
    }

    fn test_failover<'a>(
        &'a self,
        vm: &'a str,
        rp: &'a RecoveryPointSelector,
        network: &'a str,
        op_id: &'a str,
    ) -> SiteFuture<'a, TestFailoverResult> {
        Box::pin(async move {
            let body = json!({"operationId": op_id, "recoveryPoint": rp.0, "network": network});
            self.json(
                Method::POST,
                &vm_path(vm, "/test-failover"),
                Some(body),
                LONG,
            )
            .await
        })
    }

    fn test_failover_cleanup<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, ()> {
        Box::pin(async move {
            let body = json!({"operationId": op_id});
            self.unit(
                Method::POST,
                &vm_path(vm, "/test-failover/cleanup"),
                Some(body),
                LONG,
            )
            .await
        })
    }

    fn commit<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, CommitResult> {
        Box::pin(async move {
            let body = json!({"operationId": op_id});
            self.json(Method::POST, &vm_path(vm, "/commit"), Some(body), LONG)
                .await
        })
    }

    fn digest<'a>(&'a self, vm: &'a str, disk: &'a str) -> SiteFuture<'a, String> {
        Box::pin(async move {
            #[derive(Deserialize)]
            struct D {
                sha256: String,
            }
            let path = vm_path(vm, &format!("/disks/{}/digest", enc(disk)));
            let d: D = self.json(Method::GET, &path, None, LONG).await?;
            Ok(d.sha256)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_vm_listing() {
        let doc = serde_json::json!({"site": "primary", "vms": [
            {"name": "web-01", "power": "Running", "role": "Primary", "integrationServices": true,
             "disks": [{"name": "disk0", "sizeBytes": 1048576}],
             "replication": {"state": "Replicating", "direction": "Outbound", "peerSite": "secondary",
                             "intervalSeconds": 300, "lastSyncTime": "2026-01-02T03:04:05Z", "pendingBytes": 0,
                             "bytesSent": 123, "lastError": null},
             "recoveryPoints": {"count": 3, "latest": {"id": "rp-000003", "time": "2026-01-02T03:04:05Z",
                                "appConsistent": false, "kind": "CrashConsistent"},
                                "latestAppConsistent": null},
             "testCopy": null},
            {"name": "db-01", "power": "Off", "role": "Replica", "disks": []}
        ]});
        let list: VmList = serde_json::from_value(doc).unwrap();
        let vm = &list.vms[0];
        assert_eq!(vm.replication.state, ReplicationState::Replicating);
        assert_eq!(vm.replication.direction, Some(Direction::Outbound));
        assert_eq!(vm.replication.bytes_sent, 123);
        assert_eq!(vm.recovery_points.count, 3);
        assert_eq!(
            vm.recovery_points.latest.as_ref().map(|p| p.id.as_str()),
            Some("rp-000003")
        );
        assert_eq!(list.vms[1].replication.state, ReplicationState::Disabled);
        let o = crate::controller::sites::observed(vm);
        assert!(o.runs());
        assert_eq!(o.recovery_points.unwrap().count, 3);
    }

    #[test]
    fn names_are_escaped_in_paths() {
        assert_eq!(enc("web-01"), "web-01");
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }
}
