//! Webhook actions: one HTTP POST of the plan, group and direction as JSON; a 2xx answer within
//! the action's timeout is success, anything else is a failure with a message saying why.
//!
//! What keeps a webhook from becoming a way into places it should not reach:
//! - a URL that carries credentials (`user:password@`) is refused (the CRD refuses it too);
//! - an allow-list of hosts ([`AllowedHosts`], `--webhook-allowed-hosts`) refuses every other
//!   host before anything is sent; empty (the default) means no webhook is called at all;
//! - a host name is resolved once per call and every address it resolves to is checked
//!   ([`Target::resolve`]): loopback, link-local (cloud metadata), unspecified, multicast and
//!   broadcast addresses are refused unless the allow-list names that address itself; the call
//!   then connects to the checked addresses only, so a second DNS answer (rebinding) is never
//!   used;
//! - no redirect is followed;
//! - at most [`RESPONSE_LIMIT`] bytes of an answer are read, the rest is dropped unread;
//! - the URL is shown without its user info, query and fragment ([`redact`]), and logs show
//!   only its origin ([`origin`]);
//! - a signing key (`--webhook-signing-secret`) signs every body:
//!   `X-Twinsite-Signature: sha256=<hex of HMAC-SHA256(key, body)>`;
//! - `webhook.caBundle` makes an https receiver's certificate chain to that CA only.

use std::time::Duration;

use reqwest::Url;

pub use crate::redact::redact;
use serde::Serialize;

/// The header that carries the body's HMAC-SHA256 signature, `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "X-Twinsite-Signature";
/// Bytes of an answer read at most (for the failure message); the rest is never read.
pub const RESPONSE_LIMIT: usize = 4096;
/// Characters of an answer shown in a failure message.
const SHOWN: usize = 200;

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
    /// When the controller sent this call (RFC 3339): with the signature, a receiver can
    /// refuse an old body replayed.
    pub sent_at: String,
}

/// Hosts the controller may call webhooks on: names (`hooks.example.com`), wildcards of one
/// domain's subdomains (`*.example.com`) or IP addresses (`10.0.0.7`, `::1`). Any port. Empty
/// (the default): no host, so no webhook is called.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedHosts(Vec<String>);

impl AllowedHosts {
    /// From the flag's entries; empty entries are ignored.
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Self {
        Self(
            entries
                .iter()
                .map(|e| normalize_host(e.as_ref()))
                .filter(|e| !e.is_empty())
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The allow-list names this address itself (not only a name that resolves to it).
    fn names_address(&self, ip: std::net::IpAddr) -> bool {
        self.0
            .iter()
            .any(|e| e.parse::<std::net::IpAddr>().is_ok_and(|a| a == ip))
    }

    pub fn allows(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.0.iter().any(|e| match e.strip_prefix("*.") {
            Some(domain) => host
                .strip_suffix(domain)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => *e == host,
        })
    }
}

/// Lower case, without IPv6 brackets or a trailing dot.
fn normalize_host(h: &str) -> String {
    let h = h.trim().to_ascii_lowercase();
    let h = h
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(&h);
    h.strip_suffix('.').unwrap_or(h).to_string()
}

/// Controller-wide webhook settings (controller flags).
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Only these hosts are called; none when empty.
    pub allowed_hosts: AllowedHosts,
    /// Where the signing key is: a Secret in the controller's secret namespace.
    pub signing_secret: Option<SigningSecretRef>,
}

/// The Secret (and its key) that holds the HMAC-SHA256 signing key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SigningSecretRef {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

/// An HMAC-SHA256 key; its `Debug` shows no key material.
#[derive(Clone, Debug)]
pub struct SigningKey(ring::hmac::Key);

impl SigningKey {
    pub fn new(secret: &[u8]) -> Self {
        Self(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    /// The header value for `body`: `sha256=<hex>`.
    pub fn sign(&self, body: &[u8]) -> String {
        format!("sha256={}", hex::encode(ring::hmac::sign(&self.0, body)))
    }
}

/// A webhook URL that may be called.
#[derive(Clone)]
pub struct Target {
    url: Url,
}

/// Whether an address is one a webhook must not reach unless the allow-list names it:
/// this machine, link-local (where cloud metadata services answer), unspecified, multicast
/// or broadcast, also as an IPv4-mapped IPv6 address.
fn is_special(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_special(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local()
        }
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Target")
            .field(&redact(self.url.as_str()))
            .finish()
    }
}

impl Target {
    /// The URL as shown in status and Events: without user info, query or fragment.
    pub fn shown(&self) -> String {
        redact(self.url.as_str())
    }

    /// The URL's origin (scheme, host, port), as logs show it.
    pub fn origin(&self) -> String {
        self.url.origin().ascii_serialization()
    }

    /// The addresses to connect to: the host's own address, or every address its name
    /// resolves to, each checked. A special address ([`is_special`]) is refused unless the
    /// allow-list names it, so an allowed name that resolves (or is rebound) to this machine or
    /// to a metadata service is not called.
    pub async fn resolve(
        &self,
        allowed: &AllowedHosts,
    ) -> Result<Vec<std::net::SocketAddr>, String> {
        let host = self.url.host_str().unwrap_or_default();
        let port = self.url.port_or_known_default().unwrap_or(443);
        let addrs: Vec<std::net::SocketAddr> = match self.url.host() {
            Some(url::Host::Ipv4(ip)) => vec![(ip, port).into()],
            Some(url::Host::Ipv6(ip)) => vec![(ip, port).into()],
            _ => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| {
                    format!("webhook host {host} does not resolve: {e}; nothing was sent")
                })?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(format!(
                "webhook host {host} resolves to no address; nothing was sent"
            ));
        }
        if let Some(a) = addrs
            .iter()
            .find(|a| is_special(a.ip()) && !allowed.names_address(a.ip()))
        {
            return Err(format!(
                "webhook host {host} resolves to {}, an address webhooks may not reach \
                 (loopback, link-local, unspecified, multicast or broadcast) unless \
                 --webhook-allowed-hosts names that address itself; nothing was sent",
                a.ip()
            ));
        }
        Ok(addrs)
    }

    /// The host name to pin to the checked addresses (None for an address URL).
    pub fn host_name(&self) -> Option<&str> {
        match self.url.host() {
            Some(url::Host::Domain(d)) => Some(d),
            _ => None,
        }
    }
}

/// Checks a webhook URL before anything is sent: an http(s) URL without credentials whose host
/// the allow-list names. The error is the message to record; it never repeats the URL's
/// credentials or query.
pub fn check(raw: &str, allowed: &AllowedHosts) -> Result<Target, String> {
    let url = Url::parse(raw.trim())
        .map_err(|e| format!("webhook.url {} is not a valid URL: {e}", redact(raw)))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!(
            "webhook.url {} must be an http:// or https:// URL",
            redact(raw)
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "webhook.url {} carries credentials (user:password@), which are never sent: \
             remove them (a receiver can check the {SIGNATURE_HEADER} header instead)",
            redact(raw)
        ));
    }
    let Some(host) = url.host_str() else {
        return Err(format!("webhook.url {} has no host", redact(raw)));
    };
    if allowed.is_empty() {
        return Err(format!(
            "webhooks are off: the controller's allow-list (--webhook-allowed-hosts, chart value \
             webhooks.allowedHosts) is empty; add {} to it to call this webhook; nothing was sent",
            normalize_host(host)
        ));
    }
    if !allowed.allows(host) {
        return Err(format!(
            "webhook host {} is not allowed: the controller calls only the hosts of its \
             allow-list (--webhook-allowed-hosts); nothing was sent",
            normalize_host(host)
        ));
    }
    Ok(Target { url })
}

/// An HTTP client for one webhook call: no redirects (a POST is not replayed elsewhere; a 3xx
/// is a failure like any other non-2xx answer), connecting to `pin`'s checked addresses for
/// its host name only. With `ca_pem`, an https certificate must chain to those CAs and no
/// other.
pub fn client(
    ca_pem: Option<&[u8]>,
    pin: Option<(&str, &[std::net::SocketAddr])>,
) -> Result<reqwest::Client, String> {
    crate::init_crypto();
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("twinsite/", env!("CARGO_PKG_VERSION")));
    if let Some((host, addrs)) = pin {
        b = b.resolve_to_addrs(host, addrs);
    }
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| "webhook.caBundle holds no PEM certificate".to_string())?;
        b = b.tls_certs_only(certs);
    }
    b.build().map_err(|e| {
        format!(
            "building the webhook HTTP client: {}",
            chain(&e.without_url())
        )
    })
}

/// POSTs `payload` to `target`, signed when `key` is given; Ok with a short note on a 2xx
/// answer within `timeout`, Err naming the status or the error otherwise.
pub async fn call(
    http: &reqwest::Client,
    target: &Target,
    payload: &Payload,
    key: Option<&SigningKey>,
    timeout: Duration,
) -> Result<String, String> {
    let shown = target.shown();
    let body = serde_json::to_vec(payload).map_err(|e| format!("encoding the body: {e}"))?;
    let mut req = http
        .post(target.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .timeout(timeout);
    if let Some(key) = key {
        req = req.header(SIGNATURE_HEADER, key.sign(&body));
    }
    let send = req.body(body).send();
    // The request's own timeout covers connecting and the answer; this one covers the rest.
    let mut resp = match tokio::time::timeout(timeout + Duration::from_secs(1), send).await {
        Err(_) => return Err(timed_out(&shown, timeout)),
        Ok(Err(e)) if e.is_timeout() => return Err(timed_out(&shown, timeout)),
        Ok(Err(e)) => return Err(format!("POST {shown} failed: {}", chain(&e.without_url()))),
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    if status.is_success() {
        // The answer's body is not read: dropping it closes the connection.
        return Ok(format!("POST {shown}: HTTP {status}"));
    }
    let head = tokio::time::timeout(Duration::from_secs(2), read_head(&mut resp))
        .await
        .unwrap_or_default();
    drop(resp);
    let body = shown_text(&head);
    Err(if body.is_empty() {
        format!("POST {shown}: HTTP {status}")
    } else {
        format!("POST {shown}: HTTP {status}: {body}")
    })
}

/// At most [`RESPONSE_LIMIT`] bytes of an answer's body; the rest stays unread.
async fn read_head(resp: &mut reqwest::Response) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < RESPONSE_LIMIT {
        match resp.chunk().await {
            Ok(Some(c)) => {
                let room = RESPONSE_LIMIT - out.len();
                out.extend_from_slice(&c[..c.len().min(room)]);
            }
            _ => break,
        }
    }
    out
}

/// The start of an answer as a status message may show it: trimmed, control characters
/// replaced, at most [`SHOWN`] characters.
fn shown_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .trim()
        .chars()
        .take(SHOWN)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn timed_out(shown: &str, timeout: Duration) -> String {
    format!(
        "POST {shown}: no answer within {}s (timeoutSeconds)",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_drops_user_info_query_and_fragment() {
        for (raw, want) in [
            (
                "https://u:p4ss@hooks.example.com:8443/a/b?token=s3cr3t#frag",
                "https://hooks.example.com:8443/a/b",
            ),
            (
                "http://127.0.0.1:9000/hooks/warm",
                "http://127.0.0.1:9000/hooks/warm",
            ),
            ("http://u@h/x?y", "http://h/x"),
            // Not a URL the parser takes: cut by hand.
            ("http://u:p4ss@exa mple/x?token=s3cr3t", "http://exa mple/x"),
            ("u:p4ss@host?q=s3cr3t", "host"),
        ] {
            let got = redact(raw);
            assert_eq!(got, want, "{raw}");
            assert!(!got.contains("p4ss") && !got.contains("s3cr3t"));
        }
    }

    #[test]
    fn urls_with_credentials_are_refused_without_repeating_them() {
        let hooks = AllowedHosts::new(&["hooks.example.com"]);
        for raw in [
            "https://user:p4ss@hooks.example.com/x",
            "https://user@hooks.example.com/x",
            "https://:p4ss@hooks.example.com/x",
        ] {
            let e = check(raw, &hooks).unwrap_err();
            assert!(e.contains("credentials"), "{e}");
            assert!(!e.contains("p4ss") && !e.contains("user@"), "{e}");
        }
        assert!(check("ftp://hooks.example.com/x", &hooks).is_err());
        assert!(check("not a url", &hooks).is_err());
        let t = check("https://hooks.example.com/x?token=s3cr3t", &hooks).unwrap();
        assert_eq!(t.shown(), "https://hooks.example.com/x");
        assert_eq!(t.origin(), "https://hooks.example.com");
        assert!(!format!("{t:?}").contains("s3cr3t"));
    }

    #[test]
    fn the_allow_list_names_hosts_wildcards_and_addresses() {
        assert!(AllowedHosts::new(&["", " "]).is_empty());
        let a = AllowedHosts::new(&[
            "Hooks.Example.com",
            "*.ops.example.org",
            "10.0.0.7",
            "[::1]",
        ]);
        for ok in [
            "https://hooks.example.com/x",
            "https://HOOKS.example.com.:444/x",
            "https://a.ops.example.org/x",
            "https://a.b.ops.example.org/x",
            "http://10.0.0.7:9000/x",
            "http://[::1]:9000/x",
        ] {
            assert!(check(ok, &a).is_ok(), "{ok}");
        }
        for refused in [
            "https://evil.example.com/x",
            "https://ops.example.org/x",
            "https://xops.example.org/x",
            "https://hooks.example.com.evil.net/x",
            "http://10.0.0.8/x",
            "http://127.0.0.1/x",
            "http://169.254.169.254/latest/meta-data",
        ] {
            let e = check(refused, &a).unwrap_err();
            assert!(e.contains("is not allowed"), "{refused}: {e}");
        }
    }

    #[test]
    fn the_allow_list_sees_the_host_a_url_parser_sees() {
        // Other spellings of an address are compared in their usual form.
        let local = AllowedHosts::new(&["127.0.0.1"]);
        for spelled in [
            "http://2130706433/x",
            "http://0x7f.0.0.1/x",
            "http://127.1/x",
        ] {
            assert!(check(spelled, &local).is_ok(), "{spelled}");
        }
        let names = AllowedHosts::new(&["hooks.example.com"]);
        for spelled in [
            "http://2130706433/x",
            "http://hooks.example.com@127.0.0.1/x",
        ] {
            assert!(check(spelled, &names).is_err(), "{spelled}");
        }
    }

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        let key = SigningKey::new(b"Jefe");
        assert_eq!(
            key.sign(b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(!format!("{key:?}").contains("Jefe"));
    }

    #[test]
    fn shown_text_is_short_and_printable() {
        let long = "x".repeat(10_000);
        assert_eq!(shown_text(long.as_bytes()).len(), SHOWN);
        assert_eq!(shown_text(b" a\nb\x1b[31m "), "a b [31m");
    }

    #[test]
    fn a_ca_bundle_without_certificates_is_refused() {
        let e = client(Some(b"not a certificate"), None).unwrap_err();
        assert!(e.contains("caBundle"), "{e}");
    }

    #[test]
    fn an_empty_allow_list_calls_no_webhook() {
        let none = AllowedHosts::default();
        for url in ["https://hooks.example.com/x", "http://127.0.0.1:9000/x"] {
            let e = check(url, &none).unwrap_err();
            assert!(
                e.contains("webhooks are off") && e.contains("--webhook-allowed-hosts"),
                "{url}: {e}"
            );
        }
    }

    #[tokio::test]
    async fn a_name_resolving_to_a_special_address_is_refused_unless_that_address_is_listed() {
        // `localhost` resolves to loopback from /etc/hosts, with no DNS server needed.
        let by_name = AllowedHosts::new(&["localhost"]);
        let t = check("http://localhost:9000/x", &by_name).unwrap();
        let e = t.resolve(&by_name).await.unwrap_err();
        assert!(
            e.contains("may not reach") && e.contains("nothing was sent"),
            "{e}"
        );
        let listed = AllowedHosts::new(&["localhost", "127.0.0.1", "::1"]);
        let addrs = t.resolve(&listed).await.unwrap();
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 9000),
            "{addrs:?}"
        );
        // An address URL is its own resolution; listing it is what allows it.
        let ip = AllowedHosts::new(&["127.0.0.1"]);
        let t = check("http://127.0.0.1:9000/x", &ip).unwrap();
        assert_eq!(t.resolve(&ip).await.unwrap().len(), 1);
        assert_eq!(t.host_name(), None);
        for special in [
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::ffff:127.0.0.1",
            "fe80::1",
        ] {
            assert!(is_special(special.parse().unwrap()), "{special}");
        }
        for plain in ["10.0.0.7", "192.168.1.2", "2001:db8::1", "8.8.8.8"] {
            assert!(!is_special(plain.parse().unwrap()), "{plain}");
        }
    }
}
