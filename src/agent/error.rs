//! The agent's errors: of a request, as storage and replication see them (a kind and a reason;
//! the server maps each kind to an HTTP status, nothing here knows HTTP), and of its startup.

/// What went wrong, by who can fix it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or out of range.
    BadRequest,
    /// No or a wrong token.
    Unauthorized,
    /// The token does not reach this route or VM.
    Forbidden,
    NotFound,
    /// The VM's state does not allow the request now.
    Conflict,
    PayloadTooLarge,
    /// The peer site failed or refused.
    BadGateway,
    /// The agent is stopping, or out of a resource (open files, space) for now.
    Unavailable,
    /// Storage or an internal fault.
    Internal,
}

/// A refused or failed request: answered as `{"error": message, "reason": reason}`.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// Machine-readable reason, where a caller acts on it.
    pub reason: Option<&'static str>,
}

pub type ApiResult<T> = Result<T, ApiError>;

/// `reason` of a 409 that sends the source of a cycle to resynchronize.
pub const RESYNC_REQUIRED: &str = "ResyncRequired";
/// `reason` of a 503: the agent ran out of file descriptors.
pub const OUT_OF_FILES: &str = "TooManyOpenFiles";
/// `reason` of a 503: the agent's data directory is full.
pub const OUT_OF_SPACE: &str = "StorageFull";

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            reason: None,
        }
    }
    /// A conflict that sends the source of a cycle to resynchronize.
    pub fn resync(m: impl Into<String>) -> Self {
        Self {
            reason: Some(RESYNC_REQUIRED),
            ..Self::conflict(m)
        }
    }
    pub fn bad(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, m)
    }
    pub fn peer(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadGateway, m)
    }
    /// A storage error; running out of a resource the operator can add (open files, space) is
    /// a 503 that says which, not an internal fault.
    pub fn io(e: std::io::Error) -> Self {
        use std::io::ErrorKind as Io;
        let out_of = match (e.kind(), e.raw_os_error()) {
            (_, Some(libc::EMFILE | libc::ENFILE)) => Some((
                OUT_OF_FILES,
                "the agent has too many open files: raise its open-file limit (LimitNOFILE, \
                 ulimit -n) or protect fewer VMs at this site",
            )),
            (Io::StorageFull | Io::QuotaExceeded, _) => Some((
                OUT_OF_SPACE,
                "the agent's data directory is full: free or add space",
            )),
            _ => None,
        };
        match out_of {
            Some((reason, what)) => Self {
                reason: Some(reason),
                ..Self::new(ErrorKind::Unavailable, format!("storage: {what} ({e})"))
            },
            None => Self::internal(format!("storage: {e}")),
        }
    }
}

/// Errors of the agent's startup.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading token file: {0}")]
    Token(std::io::Error),
    #[error("token file is empty")]
    EmptyToken,
    #[error("reading peer token file: {0}")]
    PeerToken(std::io::Error),
    #[error("peer token file holds no token")]
    EmptyPeerToken,
    #[error("peer token file: line {0} is not SITE TOKEN")]
    PeerTokenLine(usize),
    #[error(
        "peer token file: line {0} names no site: write SITE TOKEN, so that the token reaches \
         only the replicas of that site's VMs (a token with no site would reach every site's)"
    )]
    PeerTokenWithoutSite(usize),
    #[error("peer credentials ({0}): {1}")]
    PeerCredentials(std::path::PathBuf, std::io::Error),
    #[error("a token of the peer token file is the controller token; give peers their own")]
    PeerTokenIsControllerToken,
    #[error("loading TLS certificate or key: {0}")]
    Tls(std::io::Error),
    #[error(
        "no TLS certificate: give --tls-cert and --tls-key to serve https, or --insecure-http \
         to serve plain http"
    )]
    NoTls,
    #[error("data directory: {0}")]
    Store(#[from] ApiError),
    #[error("runtime: {0}")]
    Runtime(String),
    #[error("listening: {0}")]
    Listen(std::io::Error),
}
