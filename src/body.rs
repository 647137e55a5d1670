//! Answers of other processes (a site agent to the controller, a peer agent to an agent) read
//! with a size limit, and an error answer shown only by its start: whoever answers cannot make
//! the reader hold more than it expects, nor put more than a few hundred characters, or a
//! token, into a status, condition, Event or log.

/// Bytes of an error answer read at most; the rest is never read and the connection is dropped.
pub const ERROR_READ: usize = 4096;
/// Characters of an error answer shown.
pub const SHOWN: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the answer is larger than {limit} bytes; the rest was not read")]
    TooLarge { limit: usize },
    #[error("reading the answer: {0}")]
    Read(String),
}

/// The whole body of `resp`, or [`BodyError::TooLarge`] as soon as it passes `limit` bytes
/// (announced or received).
pub async fn read_limited(
    resp: &mut reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    if resp
        .content_length()
        .is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX))
    {
        return Err(BodyError::TooLarge { limit });
    }
    let mut out = Vec::new();
    while let Some(c) = resp
        .chunk()
        .await
        .map_err(|e| BodyError::Read(e.without_url().to_string()))?
    {
        if out.len() + c.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}

/// At most `limit` bytes of the body of `resp`; the rest stays unread, and a read error ends
/// what is read.
pub async fn read_head(resp: &mut reqwest::Response, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < limit {
        match resp.chunk().await {
            Ok(Some(c)) => {
                let room = limit - out.len();
                out.extend_from_slice(&c[..c.len().min(room)]);
            }
            _ => break,
        }
    }
    out
}

/// An error answer as it may be shown: its `error` field when it is the agents' JSON error
/// body, else its text; each of `secrets` (the tokens the caller holds, which a hostile
/// answer may echo) replaced by `[redacted]`, control characters by spaces, at most [`SHOWN`]
/// characters (`...` marks a cut).
pub fn shown(body: &[u8], secrets: &[&str]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorField {
        error: String,
    }
    let mut text = serde_json::from_slice::<ErrorField>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(s, "[redacted]");
    }
    let text = text.trim();
    let mut out: String = text
        .chars()
        .take(SHOWN)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(SHOWN).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_is_cut_redacted_and_plain() {
        let long = format!("bad token tok-123456 here\n{}", "x".repeat(10_000));
        let s = shown(long.as_bytes(), &["tok-123456"]);
        assert!(s.starts_with("bad token [redacted] here x"), "{s}");
        assert!(!s.contains("tok-123456"));
        assert_eq!(s.chars().count(), SHOWN + 3);
        assert_eq!(
            shown(br#"{"error":"vm web-01 not found"}"#, &[]),
            "vm web-01 not found"
        );
        // An empty secret (no token configured) replaces nothing.
        assert_eq!(shown(b"short", &[""]), "short");
    }
}
