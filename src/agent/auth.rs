//! Who calls: the controller's token reaches every route; a peer agent's credential, always
//! bound to one site (installed by the controller through `PUT /v1/peer-credentials/{site}`, or
//! a `SITE TOKEN` line of `--peer-token-file`), only the agent-to-agent routes, and there only
//! the VMs that replicate from that site.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::AgentError;
use super::{ApiError, ErrorKind, Shared};
use crate::secret::Secret;

/// A peer agent's token from `--peer-token-file`.
#[derive(Debug)]
pub(super) struct PeerToken {
    /// The peer site it belongs to: a token speaks for one site only.
    site: String,
    pub(super) token: Secret,
}

impl PeerToken {
    /// One token per line: `SITE TOKEN`; blank lines and `#` comments are skipped. A token with
    /// no site would reach every site's replicas: refused.
    pub(super) fn parse(text: &str) -> Result<Vec<Self>, AgentError> {
        let mut tokens = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            tokens.push(match fields[..] {
                [_] => return Err(AgentError::PeerTokenWithoutSite(i + 1)),
                [site, token] => PeerToken {
                    site: site.to_string(),
                    token: token.into(),
                },
                _ => return Err(AgentError::PeerTokenLine(i + 1)),
            });
        }
        if tokens.is_empty() {
            return Err(AgentError::EmptyPeerToken);
        }
        Ok(tokens)
    }
}

/// Who presented the request's token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Caller {
    Controller,
    /// A peer agent, with the site its credential is bound to.
    Peer {
        site: String,
    },
}

impl Caller {
    /// The site a peer's credential is bound to: its requests reach only that site's VMs.
    pub(super) fn bound_site(&self) -> Option<&str> {
        match self {
            Caller::Peer { site } => Some(site),
            Caller::Controller => None,
        }
    }
}

pub(super) async fn auth(State(st): State<Shared>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().as_bytes());
    let caller = presented.and_then(|t| {
        if constant_time_eq(t, st.token.expose().as_bytes()) {
            return Some(Caller::Controller);
        }
        // Every peer token is compared (no early exit on a match).
        let mut found = None;
        for p in &st.peer_tokens {
            if constant_time_eq(t, p.token.expose().as_bytes()) && found.is_none() {
                found = Some(Caller::Peer {
                    site: p.site.clone(),
                });
            }
        }
        let installed = st
            .installed
            .read()
            .ok()
            .and_then(|i| i.site_of(t))
            .map(|site| Caller::Peer { site });
        found.or(installed)
    });
    match caller {
        Some(c) => {
            req.extensions_mut().insert(c);
            next.run(req).await
        }
        None => {
            ApiError::new(ErrorKind::Unauthorized, "missing or wrong bearer token").into_response()
        }
    }
}

/// In front of every route that is not an agent-to-agent one: a peer's token gets 403.
pub(super) async fn controller_only(req: Request, next: Next) -> Response {
    if req.extensions().get::<Caller>() == Some(&Caller::Controller) {
        next.run(req).await
    } else {
        ApiError::new(
            ErrorKind::Forbidden,
            "a peer agent's token reaches only the agent-to-agent routes (/v1/replica/...)",
        )
        .into_response()
    }
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
