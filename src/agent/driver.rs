//! The source side of replication: one task per protected VM runs the bulk transfer (initial or
//! resync) and then a cycle every interval or on sync-now.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use reqwest::Method;
use tokio::sync::{mpsc, oneshot};

use super::replica::{BatchResult, BeginCycle, CommitCycle};
use super::{ApiError, Shared, with_store};
use crate::replication::tracker::Sealed;
use crate::replication::{block_count, block_hash, frame, read_block};
use crate::site::{RecoveryPoint, RecoveryPointKind, ReplicationMode, ReplicationState};

/// Blocks per request of the block stream.
const BATCH_BLOCKS: u64 = 64;
/// Attempts at a batch whose blocks the peer keeps refusing.
const MAX_RESENDS: usize = 5;

/// Test-only fault injection: with `TWINSITE_FAULT_CORRUPT_BLOCKS=N` the first N blocks sent are
/// damaged after their checksum was computed, as a bad link would.
static CORRUPT_LEFT: AtomicU64 = AtomicU64::new(0);
static CORRUPT_INIT: AtomicBool = AtomicBool::new(false);

fn take_corruption() -> bool {
    if !CORRUPT_INIT.swap(true, Ordering::SeqCst) {
        let n = std::env::var("TWINSITE_FAULT_CORRUPT_BLOCKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        CORRUPT_LEFT.store(n, Ordering::SeqCst);
    }
    CORRUPT_LEFT
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// A sync-now request: answered with the acknowledged point.
pub type SyncReply = oneshot::Sender<Result<RecoveryPoint, String>>;

/// Starts (or restarts) the driver of `vm`.
pub fn spawn(st: &Shared, vm: &str) {
    let (tx, rx) = mpsc::channel(8);
    let task = tokio::spawn(run(st.clone(), vm.to_string(), rx));
    if let Ok(mut d) = st.drivers.lock()
        && let Some((_, old)) = d.insert(vm.to_string(), (tx, task))
    {
        old.abort();
    }
}

/// Stops the driver of `vm`.
pub fn stop(st: &Shared, vm: &str) {
    if let Ok(mut d) = st.drivers.lock()
        && let Some((_, task)) = d.remove(vm)
    {
        task.abort();
    }
}

async fn run(st: Shared, vm: String, mut rx: mpsc::Receiver<SyncReply>) {
    let interval = with_store(&st, {
        let vm = vm.clone();
        move |s| {
            Ok(s.rec(&vm)?
                .meta
                .outbound
                .as_ref()
                .map(|o| o.interval_seconds))
        }
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(300)
    .max(1);
    let period = Duration::from_secs(interval);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // The first run (bulk transfer and first point) starts at once; then every interval.
    let mut first = true;
    loop {
        let reply = if std::mem::take(&mut first) {
            None
        } else {
            tokio::select! {
                _ = tick.tick() => None,
                r = rx.recv() => match r { Some(r) => Some(r), None => return },
            }
        };
        let res = run_once(&st, &vm).await;
        if let Err(e) = &res {
            tracing::warn!(vm, error = %e, "replication cycle failed");
            let msg = e.clone();
            let vm2 = vm.clone();
            let _ = with_store(&st, move |s| {
                if let Some(o) = s.rec_mut(&vm2)?.meta.outbound.as_mut() {
                    o.last_error = Some(msg);
                }
                s.save(&vm2)
            })
            .await;
        }
        if let Some(r) = reply {
            let _ = r.send(res);
        }
    }
}

struct Peer {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Peer {
    async fn call(
        &self,
        method: Method,
        path: &str,
        json: Option<serde_json::Value>,
        body: Option<Vec<u8>>,
    ) -> Result<bytes::Bytes, String> {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(600));
        if let Some(j) = json {
            req = req.json(&j);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("peer unreachable: {e}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| format!("peer: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "peer answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        Ok(bytes)
    }
}

/// The HTTP client for a peer agent; an https peer is trusted through `ca_pem` only.
fn peer_http(ca_pem: Option<&str>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
            .map_err(|e| format!("peer CA: {e}"))?;
        builder = builder.tls_certs_only(certs);
    }
    builder.build().map_err(|e| e.to_string())
}

fn new_cycle_id() -> String {
    let n = Timestamp::now().as_nanosecond();
    format!("c{n:x}")
}

/// One step of replication: the pending bulk transfer if any, then a cycle.
async fn run_once(st: &Shared, vm: &str) -> Result<RecoveryPoint, String> {
    let vm_s = vm.to_string();
    let (o, disks, is) = with_store(st, move |s| {
        let r = s.rec(&vm_s)?;
        let o = r
            .meta
            .outbound
            .clone()
            .filter(|o| !o.stopped)
            .ok_or_else(|| ApiError::conflict("replication is not enabled"))?;
        Ok((o, r.meta.disks.clone(), r.meta.integration_services))
    })
    .await
    .map_err(|e| e.message)?;
    let peer = Peer {
        http: peer_http(o.peer_ca_pem.as_deref())?,
        base: o.peer_url.trim_end_matches('/').to_string(),
        token: o.peer_token.clone(),
    };
    let site = st.site.clone();
    let begin = |bulk: bool, cycle: &str| BeginCycle {
        source_site: site.clone(),
        cycle_id: cycle.to_string(),
        disks: disks.clone(),
        integration_services: is,
        retention_hours: o.retention_hours,
        bulk,
    };
    if let Some(mode) = o.bulk {
        let cycle = new_cycle_id();
        let body = serde_json::to_value(begin(true, &cycle)).map_err(|e| e.to_string())?;
        peer.call(
            Method::POST,
            &format!("/v1/replica/{vm}/begin"),
            Some(body),
            None,
        )
        .await?;
        let sealed = seal(st, vm).await?;
        let res = bulk(st, &peer, vm, &cycle, mode, &disks).await;
        let res = match res {
            Ok(sent) => {
                let c = CommitCycle {
                    cycle_id: cycle.clone(),
                    bulk: true,
                    time: Timestamp::now(),
                    kind: RecoveryPointKind::CrashConsistent,
                };
                let body = serde_json::to_value(c).map_err(|e| e.to_string())?;
                peer.call(
                    Method::POST,
                    &format!("/v1/replica/{vm}/commit"),
                    Some(body),
                    None,
                )
                .await
                .map(|_| sent)
            }
            Err(e) => Err(e),
        };
        finish(st, vm, sealed, res.as_ref().ok().copied(), true, None).await?;
        res?;
    }
    // A cycle: the blocks dirty now, read while writes are held off (a crash-consistent cut).
    let vm_s = vm.to_string();
    let (sealed, blocks, time, kind) = with_store(st, move |s| {
        let r = s.rec_mut(&vm_s)?;
        let sealed = r.tracker.seal().map_err(ApiError::io)?;
        let mut blocks = Vec::new();
        for (d, set) in sealed.sets.iter().enumerate() {
            let size = r.meta.disks[d].size_bytes;
            for b in set.iter() {
                let data = read_block(&r.disks[d], size, b).map_err(ApiError::io)?;
                blocks.push((d as u32, b, data));
            }
        }
        let now = Timestamp::now();
        let o = r.meta.outbound.as_ref();
        let due = o.is_some_and(|o| {
            o.app_consistent_hours > 0
                && o.last_app_consistent.is_none_or(|t| {
                    now.as_second() - t.as_second() >= o.app_consistent_hours as i64 * 3600
                })
        });
        let kind = if due && r.meta.integration_services {
            RecoveryPointKind::AppConsistent
        } else {
            RecoveryPointKind::CrashConsistent
        };
        Ok((sealed, blocks, now, kind))
    })
    .await
    .map_err(|e| e.message)?;
    let cycle = new_cycle_id();
    let res: Result<(u64, RecoveryPoint), String> = async {
        let body = serde_json::to_value(begin(false, &cycle)).map_err(|e| e.to_string())?;
        peer.call(
            Method::POST,
            &format!("/v1/replica/{vm}/begin"),
            Some(body),
            None,
        )
        .await?;
        let mut sent = 0;
        for chunk in blocks.chunks(BATCH_BLOCKS as usize) {
            sent += send_batch(st, &peer, vm, &cycle, false, chunk).await?;
        }
        let c = CommitCycle {
            cycle_id: cycle.clone(),
            bulk: false,
            time,
            kind,
        };
        let body = serde_json::to_value(c).map_err(|e| e.to_string())?;
        let bytes = peer
            .call(
                Method::POST,
                &format!("/v1/replica/{vm}/commit"),
                Some(body),
                None,
            )
            .await?;
        let rp: Option<RecoveryPoint> =
            serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        let rp = rp.ok_or("peer made no recovery point")?;
        Ok((sent, rp))
    }
    .await;
    let app = (kind == RecoveryPointKind::AppConsistent).then_some(time);
    match res {
        Ok((sent, rp)) => {
            finish(st, vm, sealed, Some(sent), false, Some((time, app))).await?;
            Ok(rp)
        }
        Err(e) => {
            finish(st, vm, sealed, None, false, None).await?;
            Err(e)
        }
    }
}

async fn seal(st: &Shared, vm: &str) -> Result<Sealed, String> {
    let vm = vm.to_string();
    with_store(st, move |s| {
        s.rec_mut(&vm)?.tracker.seal().map_err(ApiError::io)
    })
    .await
    .map_err(|e| e.message)
}

/// Records the outcome of a transfer: acknowledged blocks are forgotten, failed ones stay dirty.
async fn finish(
    st: &Shared,
    vm: &str,
    sealed: Sealed,
    sent: Option<u64>,
    bulk: bool,
    synced: Option<(Timestamp, Option<Timestamp>)>,
) -> Result<(), String> {
    let vm = vm.to_string();
    with_store(st, move |s| {
        let r = s.rec_mut(&vm)?;
        match sent {
            Some(n) => {
                r.tracker.ack(&sealed).map_err(ApiError::io)?;
                if let Some(o) = r.meta.outbound.as_mut() {
                    o.bytes_sent += n;
                    o.last_error = None;
                    if bulk {
                        o.bulk = None;
                    }
                    if let Some((t, app)) = synced {
                        o.last_sync_time = Some(t);
                        o.state = ReplicationState::Replicating;
                        if app.is_some() {
                            o.last_app_consistent = app;
                        }
                    }
                }
            }
            None => r.tracker.abort(sealed),
        }
        s.save(&vm)
    })
    .await
    .map_err(|e| e.message)
}

/// Sends one batch, resending refused blocks; returns payload bytes sent.
async fn send_batch(
    st: &Shared,
    peer: &Peer,
    vm: &str,
    cycle: &str,
    bulk: bool,
    blocks: &[(u32, u64, Vec<u8>)],
) -> Result<u64, String> {
    let mut todo: Vec<&(u32, u64, Vec<u8>)> = blocks.iter().collect();
    let mut sent = 0u64;
    for attempt in 0..MAX_RESENDS {
        let mut buf = Vec::new();
        for (d, b, data) in &todo {
            let hash = block_hash(data);
            if take_corruption() {
                let mut bad = data.clone();
                bad[0] ^= 0xff;
                frame::push_with_hash(&mut buf, *d, *b, &hash, &bad);
            } else {
                frame::push_with_hash(&mut buf, *d, *b, &hash, data);
            }
            sent += data.len() as u64;
        }
        let path = format!("/v1/replica/{vm}/cycles/{cycle}/blocks?bulk={bulk}");
        let bytes = peer.call(Method::PUT, &path, None, Some(buf)).await?;
        let res: BatchResult = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if res.refused.is_empty() {
            return Ok(sent);
        }
        tracing::warn!(
            vm,
            attempt,
            refused = res.refused.len(),
            "peer refused blocks; resending"
        );
        let n = res.refused.len() as u64;
        let vm2 = vm.to_string();
        let _ = with_store(st, move |s| {
            if let Some(o) = s.rec_mut(&vm2)?.meta.outbound.as_mut() {
                o.blocks_resent += n;
            }
            Ok(())
        })
        .await;
        todo.retain(|(d, b, _)| res.refused.contains(&(*d, *b)));
    }
    Err("peer kept refusing blocks".into())
}

/// The bulk transfer: every block (initial) or the blocks whose hashes differ (resync).
async fn bulk(
    st: &Shared,
    peer: &Peer,
    vm: &str,
    cycle: &str,
    mode: ReplicationMode,
    disks: &[crate::site::DiskSpec],
) -> Result<u64, String> {
    let mut sent = 0;
    for (d, disk) in disks.iter().enumerate() {
        let n = block_count(disk.size_bytes);
        let peer_hashes = if mode == ReplicationMode::Resync {
            Some(
                peer.call(
                    Method::GET,
                    &format!("/v1/replica/{vm}/disks/{d}/hashes"),
                    None,
                    None,
                )
                .await?,
            )
        } else {
            None
        };
        let mut start = 0;
        while start < n {
            let end = (start + BATCH_BLOCKS).min(n);
            let vm2 = vm.to_string();
            let size = disk.size_bytes;
            let hashes = peer_hashes.clone();
            let blocks = with_store(st, move |s| {
                let r = s.rec(&vm2)?;
                let mut out = Vec::new();
                for b in start..end {
                    let data = read_block(&r.disks[d], size, b).map_err(ApiError::io)?;
                    if let Some(h) = &hashes {
                        let i = (b * 32) as usize;
                        if h.get(i..i + 32) == Some(&block_hash(&data)[..]) {
                            continue;
                        }
                    }
                    out.push((d as u32, b, data));
                }
                Ok(out)
            })
            .await
            .map_err(|e| e.message)?;
            if !blocks.is_empty() {
                sent += send_batch(st, peer, vm, cycle, true, &blocks).await?;
            }
            start = end;
        }
    }
    Ok(sent)
}

/// Asks the driver of `vm` to sync now and waits for the acknowledged point.
pub async fn sync_now(st: &Shared, vm: &str) -> Result<RecoveryPoint, ApiError> {
    let tx = st
        .drivers
        .lock()
        .ok()
        .and_then(|d| d.get(vm).map(|(tx, _)| tx.clone()))
        .ok_or_else(|| ApiError::conflict(format!("replication of {vm} is not running here")))?;
    let (rtx, rrx) = oneshot::channel();
    tx.send(rtx)
        .await
        .map_err(|_| ApiError::conflict("replication stopped"))?;
    rrx.await
        .map_err(|_| ApiError::conflict("replication stopped"))?
        .map_err(|e| ApiError::new(axum::http::StatusCode::BAD_GATEWAY, e))
}
