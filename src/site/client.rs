//! HTTP client of a site agent.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::*;

/// Calls that only read or flip state answer quickly; a site that takes longer is treated as
/// unreachable so the controller can move on.
const SHORT_TIMEOUT: Duration = Duration::from_secs(30);
/// A failover or drill at the target may copy whole disks, and a digest reads them.
const LONG_TIMEOUT: Duration = Duration::from_secs(3600);
/// A graceful shutdown: the agent gives the guest 60 s by default (`--shutdown-timeout-seconds`)
/// and then fails the call; a little longer here, so its answer (and not a timeout) is seen.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(90);
/// Sync sends every block not yet sent (at most one replication interval of writes) before it
/// answers.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);
/// Stopping replication waits for a cycle in flight to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// A consistent cut pauses the plan's VMs at the source for an instant and makes one point each.
const CUT_TIMEOUT: Duration = Duration::from_secs(120);
/// Commit, drill cleanup and VM deletion remove files at the site.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(300);
/// The largest JSON answer read (a listing of every VM, 20,000 recovery points of one VM fit
/// many times over); a larger one is refused unread.
const ANSWER_LIMIT: usize = 64 << 20;

/// A [`SiteProvider`] backed by a `twinsite agent` over HTTP(S) with a bearer token.
#[derive(Clone, Debug)]
pub struct AgentClient {
    http: reqwest::Client,
    base: String,
    token: crate::secret::Secret,
    /// Sent as the namespace header on every call ([`SiteProvider::for_namespace`]).
    namespace: Option<String>,
}

impl AgentClient {
    /// `url` is the agent's base URL (`http://host:port`); `ca_pem` the CA that signed its
    /// certificate when it speaks https. Call [`crate::init_crypto`] first.
    pub fn new(url: &str, token: &str, ca_pem: Option<&[u8]>) -> Result<Self, SiteError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30));
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| SiteError::BadRequest(format!("CA PEM: {e}")))?;
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .map_err(|e| SiteError::Other(0, format!("building HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: url.trim_end_matches('/').to_string(),
            token: token.into(),
            namespace: None,
        })
    }

    /// The agent's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str, timeout: Duration) -> reqwest::RequestBuilder {
        let req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(self.token.expose())
            .timeout(timeout);
        match &self.namespace {
            Some(ns) => req.header(NAMESPACE_HEADER, ns),
            None => req,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, SiteError> {
        let resp = req
            .send()
            .await
            .map_err(|e| SiteError::Unreachable(error_chain(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        // An error answer lands in conditions and Events: only its start is read and shown.
        let mut resp = resp;
        let head = crate::body::read_head(&mut resp, crate::body::ERROR_READ).await;
        drop(resp);
        let message = crate::body::shown(&head, &[self.token.expose()]);
        Err(match status {
            StatusCode::UNAUTHORIZED => SiteError::Unauthorized(message),
            StatusCode::NOT_FOUND => SiteError::NotFound(message),
            StatusCode::CONFLICT => SiteError::Conflict(message),
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
                SiteError::BadRequest(message)
            }
            s => SiteError::Other(s.as_u16(), message),
        })
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T, SiteError> {
        let mut req = self.request(method, path, timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let mut resp = self.send(req).await?;
        let status = resp.status().as_u16();
        let body = crate::body::read_limited(&mut resp, ANSWER_LIMIT)
            .await
            .map_err(|e| SiteError::Other(status, e.to_string()))?;
        serde_json::from_slice::<T>(&body)
            .map_err(|e| SiteError::Other(status, format!("decoding answer: {e}")))
    }

    /// Guest write of `data` at `offset`; returns once durable at the site.
    /// `POST /v1/vms/{vm}/{route}` with a JSON body.
    async fn vm_post<B: Serialize, T: DeserializeOwned>(
        &self,
        vm: &str,
        route: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, SiteError> {
        let path = format!("/v1/vms/{}/{route}", enc(vm));
        self.call(Method::POST, &path, Some(body), timeout).await
    }

    /// `POST /v1/vms/{vm}/{route}` of an operation that carries only its id.
    async fn vm_op<T: DeserializeOwned>(
        &self,
        vm: &str,
        route: &str,
        op_id: &str,
        timeout: Duration,
    ) -> Result<T, SiteError> {
        let body = OperationRequest {
            operation_id: op_id.to_string(),
        };
        self.vm_post(vm, route, &body, timeout).await
    }

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
        let req = self.request(Method::PUT, &path, LONG_TIMEOUT).body(data);
        self.send(req).await.map(|_| ())
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
        let mut resp = self
            .send(self.request(Method::GET, &path, LONG_TIMEOUT))
            .await?;
        // The agent answers exactly `length` bytes.
        let limit = usize::try_from(length).unwrap_or(usize::MAX);
        crate::body::read_limited(&mut resp, limit)
            .await
            .map_err(|e| SiteError::Other(200, e.to_string()))
    }
}

fn enc(s: &str) -> String {
    // VM and disk names are DNS-like; escape the few characters that would break a path.
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl SiteProvider for AgentClient {
    fn for_namespace(&self, namespace: &str) -> Option<std::sync::Arc<dyn SiteProvider>> {
        Some(std::sync::Arc::new(Self {
            namespace: Some(namespace.to_string()),
            ..self.clone()
        }))
    }

    fn health(&self) -> SiteFuture<'_, ()> {
        Box::pin(async move {
            let req = self.request(Method::GET, "/healthz", SHORT_TIMEOUT);
            self.send(req).await.map(|_| ())
        })
    }

    fn list_vms(&self) -> SiteFuture<'_, VmList> {
        Box::pin(self.call::<(), _>(Method::GET, "/v1/vms", None, SHORT_TIMEOUT))
    }

    fn get_vm<'a>(&'a self, vm: &'a str) -> SiteFuture<'a, Vm> {
        Box::pin(async move {
            let path = format!("/v1/vms/{}", enc(vm));
            self.call::<(), _>(Method::GET, &path, None, SHORT_TIMEOUT)
                .await
        })
    }

    fn create_vm<'a>(&'a self, vm: &'a str, spec: &'a CreateVm) -> SiteFuture<'a, Vm> {
        Box::pin(async move {
            let path = format!("/v1/vms/{}", enc(vm));
            self.call(Method::PUT, &path, Some(spec), LONG_TIMEOUT)
                .await
        })
    }

    fn delete_vm<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, ()> {
        Box::pin(async move {
            let path = format!("/v1/vms/{}?operationId={}", enc(vm), enc(op_id));
            self.call::<(), DeleteResult>(Method::DELETE, &path, None, CLEANUP_TIMEOUT)
                .await
                .map(|_| ())
        })
    }

    fn power<'a>(&'a self, vm: &'a str, action: PowerAction, op_id: &'a str) -> SiteFuture<'a, Vm> {
        Box::pin(async move {
            let body = PowerRequest {
                action,
                operation_id: Some(op_id.to_string()),
            };
            // Start and PowerOff flip state; only a graceful shutdown waits for the guest.
            let timeout = match action {
                PowerAction::Shutdown => SHUTDOWN_TIMEOUT,
                PowerAction::Start | PowerAction::PowerOff => SHORT_TIMEOUT,
            };
            self.vm_post(vm, "power", &body, timeout).await
        })
    }

    fn enable_replication<'a>(
        &'a self,
        vm: &'a str,
        params: &'a EnableReplication,
    ) -> SiteFuture<'a, ReplicationInfo> {
        Box::pin(self.vm_post(vm, "replication/enable", params, SHORT_TIMEOUT))
    }

    fn update_replication_settings<'a>(
        &'a self,
        vm: &'a str,
        params: &'a ReplicationSettingsRequest,
    ) -> SiteFuture<'a, ReplicationInfo> {
        Box::pin(self.vm_post(vm, "replication/settings", params, SHORT_TIMEOUT))
    }

    fn accept_replication<'a>(
        &'a self,
        vm: &'a str,
        params: &'a AcceptReplication,
    ) -> SiteFuture<'a, AcceptResult> {
        Box::pin(self.vm_post(vm, "replication/accept", params, SHORT_TIMEOUT))
    }

    fn install_peer_credentials<'a>(
        &'a self,
        site: &'a str,
        creds: &'a PeerCredentials,
    ) -> SiteFuture<'a, PeerCredentialsResult> {
        Box::pin(async move {
            let path = format!("/v1/peer-credentials/{}", enc(site));
            self.call(Method::PUT, &path, Some(creds), SHORT_TIMEOUT)
                .await
        })
    }

    fn sync<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, SyncResult> {
        Box::pin(self.vm_op(vm, "replication/sync", op_id, SYNC_TIMEOUT))
    }

    fn cut<'a>(&'a self, req: &'a CutRequest) -> SiteFuture<'a, CutResult> {
        Box::pin(async move {
            self.call(Method::POST, "/v1/cuts", Some(req), CUT_TIMEOUT)
                .await
        })
    }

    fn stop_replication<'a>(
        &'a self,
        vm: &'a str,
        op_id: &'a str,
    ) -> SiteFuture<'a, ReplicationInfo> {
        Box::pin(self.vm_op(vm, "replication/stop", op_id, STOP_TIMEOUT))
    }

    fn recovery_points<'a>(&'a self, vm: &'a str) -> SiteFuture<'a, Vec<RecoveryPoint>> {
        Box::pin(async move {
            let path = format!("/v1/vms/{}/recovery-points", enc(vm));
            self.call::<(), RecoveryPointList>(Method::GET, &path, None, SHORT_TIMEOUT)
                .await
                .map(|l| l.recovery_points)
        })
    }

    fn failover<'a>(
        &'a self,
        vm: &'a str,
        rp: &'a RecoveryPointSelector,
        op_id: &'a str,
    ) -> SiteFuture<'a, FailoverResult> {
        self.failover_mapped(vm, rp, &[], op_id)
    }

    fn failover_mapped<'a>(
        &'a self,
        vm: &'a str,
        rp: &'a RecoveryPointSelector,
        networks: &'a [NetworkMap],
        op_id: &'a str,
    ) -> SiteFuture<'a, FailoverResult> {
        Box::pin(async move {
            let body = FailoverRequest {
                operation_id: op_id.to_string(),
                recovery_point: rp.clone(),
                network_mappings: networks.to_vec(),
            };
            self.vm_post(vm, "failover", &body, LONG_TIMEOUT).await
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
            let body = TestFailoverRequest {
                operation_id: op_id.to_string(),
                recovery_point: rp.clone(),
                network: network.to_string(),
            };
            self.vm_post(vm, "test-failover", &body, LONG_TIMEOUT).await
        })
    }

    fn test_failover_cleanup<'a>(
        &'a self,
        vm: &'a str,
        op_id: &'a str,
    ) -> SiteFuture<'a, CleanupResult> {
        Box::pin(self.vm_op(vm, "test-failover/cleanup", op_id, CLEANUP_TIMEOUT))
    }

    fn commit<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, CommitResult> {
        Box::pin(self.vm_op(vm, "commit", op_id, CLEANUP_TIMEOUT))
    }

    fn digest<'a>(&'a self, vm: &'a str, disk: &'a str) -> SiteFuture<'a, String> {
        Box::pin(async move {
            let path = format!("/v1/vms/{}/disks/{}/digest", enc(vm), enc(disk));
            self.call::<(), DigestResponse>(Method::GET, &path, None, LONG_TIMEOUT)
                .await
                .map(|d| d.sha256)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_the_client_hides_its_token() {
        crate::init_crypto();
        let c = AgentClient::new("http://127.0.0.1:7101", "s3cr3t-agent-token", None).unwrap();
        let dbg = format!("{c:?} {c:#?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert!(dbg.contains("127.0.0.1:7101"), "{dbg}");
    }
}
