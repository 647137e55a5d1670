//! A webhook URL as it may be shown (status, Events, logs): without user info, query and
//! fragment, where secrets ride.

use url::Url;

/// A URL as it may be shown: scheme, host, port and path, without user info, query or
/// fragment. A URL that does not parse is cut the same way by hand.
pub fn redact(raw: &str) -> String {
    if let Ok(mut u) = Url::parse(raw.trim())
        && u.has_host()
    {
        let _ = u.set_username("");
        let _ = u.set_password(None);
        u.set_query(None);
        u.set_fragment(None);
        return u.to_string();
    }
    let raw = raw.trim();
    let cut = raw.find(['?', '#']).map_or(raw, |i| &raw[..i]);
    let (scheme, rest) = match cut.find("://") {
        Some(i) => (&cut[..i + 3], &cut[i + 3..]),
        None => ("", cut),
    };
    let auth_end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..auth_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("{scheme}{rest}")
}
