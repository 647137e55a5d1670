//! Webhook actions: one HTTP POST of the plan, group and direction as JSON; a 2xx answer within
//! the action's timeout is success, anything else is a failure with a message saying why.

use std::time::Duration;

use serde::Serialize;

/// The JSON body a webhook receives.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Payload {
    pub plan: String,
    pub namespace: String,
    pub group: String,
    pub action: String,
    /// `pre` (before the group's VMs move) or `post` (after they run at the target).
    pub stage: String,
    /// `failover`, `testFailover` or `testFailoverCleanup`.
    pub direction: String,
    pub target_site: String,
    /// `Planned` or `Unplanned`.
    pub failover_type: String,
    /// The plan job; a receiver can recognise a repeated call by it (a restarted controller
    /// repeats a call whose outcome it had not recorded).
    pub job: String,
}

/// An HTTP client for webhooks: no redirects (a POST is not replayed elsewhere; a 3xx is a
/// failure like any other non-2xx answer).
pub fn client() -> Result<reqwest::Client, reqwest::Error> {
    crate::init_crypto();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("twinsite/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// POSTs `payload` to `url`; Ok with a short note on a 2xx answer within `timeout`, Err naming
/// the status or the error otherwise.
pub async fn call(
    http: &reqwest::Client,
    url: &str,
    payload: &Payload,
    timeout: Duration,
) -> Result<String, String> {
    let send = http.post(url).json(payload).timeout(timeout).send();
    // The request's own timeout covers connecting and the answer; this one covers the rest.
    let resp = match tokio::time::timeout(timeout + Duration::from_secs(1), send).await {
        Err(_) => return Err(timed_out(url, timeout)),
        Ok(Err(e)) if e.is_timeout() => return Err(timed_out(url, timeout)),
        Ok(Err(e)) => return Err(format!("POST {url} failed: {}", chain(&e))),
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    if status.is_success() {
        return Ok(format!("POST {url}: HTTP {status}"));
    }
    let body = tokio::time::timeout(Duration::from_secs(2), resp.text())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let body: String = body.trim().chars().take(200).collect();
    Err(if body.is_empty() {
        format!("POST {url}: HTTP {status}")
    } else {
        format!("POST {url}: HTTP {status}: {body}")
    })
}

fn timed_out(url: &str, timeout: Duration) -> String {
    format!(
        "POST {url}: no answer within {}s (timeoutSeconds)",
        timeout.as_secs()
    )
}

/// An error with its causes, which say what actually went wrong (refused, DNS, TLS).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = s.source();
    }
    out
}
