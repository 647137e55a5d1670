//! What any caller, with a token or without, can make the agent hold at once: request bodies in
//! flight over every route (a byte budget), and the routes without a token (`/healthz`,
//! `/metrics`) a few slots of their own and no body.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{Semaphore, TryAcquireError};

use super::{ApiError, ErrorKind, input};

/// `--max-inflight-body-bytes` by default: four of the largest bodies a route takes.
pub const DEFAULT_INFLIGHT_BODY_BYTES: u64 = 1 << 30;
/// Requests to `/healthz` and `/metrics` served at once; more get 503.
pub const OPEN_SLOTS: usize = 16;

/// The budget is counted in KiB, so that the largest fits a semaphore's permits.
const UNIT: u64 = 1024;

pub struct Budget {
    bytes: Arc<Semaphore>,
    total: u64,
    open: Arc<Semaphore>,
}

impl Budget {
    pub fn new(inflight_body_bytes: u64) -> Self {
        let units = (inflight_body_bytes / UNIT).clamp(1, u64::from(u32::MAX));
        Self {
            bytes: Arc::new(Semaphore::new(units as usize)),
            total: units * UNIT,
            open: Arc::new(Semaphore::new(OPEN_SLOTS)),
        }
    }
}

/// The most a request may bring: its Content-Length (at most what any route reads), or,
/// without one, the most its route reads. Requests without a body cost nothing.
fn charge(req: &Request) -> u64 {
    let limit = |data: bool| {
        if data {
            input::DATA_BODY_LIMIT as u64
        } else {
            input::JSON_BODY_LIMIT as u64
        }
    };
    let path = req.uri().path();
    let data = path.ends_with("/data") || path.ends_with("/blocks");
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) => n.min(limit(data)),
        None if req.headers().contains_key(header::TRANSFER_ENCODING) => limit(data),
        None if matches!(*req.method(), Method::PUT | Method::POST) => limit(data),
        None => 0,
    }
}

fn unavailable(message: String) -> Response {
    ApiError::new(ErrorKind::Unavailable, message).into_response()
}

/// Serves a request while the bodies in flight, its own included, fit the budget
/// (`--max-inflight-body-bytes`); otherwise 503 at once, before any of its body is read.
pub async fn bodies(State(b): State<Arc<Budget>>, req: Request, next: Next) -> Response {
    let bytes = charge(&req);
    if bytes == 0 {
        return next.run(req).await;
    }
    let units = bytes.div_ceil(UNIT);
    if units * UNIT > b.total {
        return ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "the request body of {bytes} bytes is larger than the agent's budget for bodies \
                 in flight ({} bytes, --max-inflight-body-bytes)",
                b.total
            ),
        )
        .into_response();
    }
    match b.bytes.clone().try_acquire_many_owned(units as u32) {
        Ok(_held) => next.run(req).await,
        Err(TryAcquireError::NoPermits) => unavailable(format!(
            "the agent holds as many request bodies in flight as its budget allows ({} bytes, \
             --max-inflight-body-bytes); retry later",
            b.total
        )),
        Err(TryAcquireError::Closed) => unavailable("agent is stopping".into()),
    }
}

/// `/healthz` and `/metrics`: no token, so no body (413) and [`OPEN_SLOTS`] at once (503
/// beyond, rather than waiting).
pub async fn open_routes(State(b): State<Arc<Budget>>, req: Request, next: Next) -> Response {
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!("{} takes no request body", req.uri().path()),
        )
        .into_response();
    }
    match b.open.clone().try_acquire_owned() {
        Ok(_slot) => next.run(req).await,
        Err(_) => unavailable(format!(
            "{OPEN_SLOTS} requests to /healthz and /metrics are being served; retry later"
        )),
    }
}
