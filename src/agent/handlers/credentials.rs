//! `PUT /v1/peer-credentials/{site}` (the controller only): the credentials of the pair of this
//! site and `site`. The inbound one is what `site`'s agent presents here, valid only on the
//! replica routes of VMs that replicate from `site`; the outbound one is what this agent
//! presents to `site`, written into every VM here that replicates there.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::response::{IntoResponse, Response};

use super::super::input::Params;
use super::super::{ApiError, ApiResult, ErrorKind, Shared, with_store};
use super::parse;
use crate::secret::Secret;
use crate::site::{PeerCredentials, PeerCredentialsResult};

/// Longest credential taken (the controller's are 64 hex characters).
const MAX_CREDENTIAL_BYTES: usize = 1024;

fn check(field: &str, s: &Secret) -> ApiResult<()> {
    let v = s.expose();
    if v.len() < 16 || v.len() > MAX_CREDENTIAL_BYTES {
        return Err(ApiError::bad(format!(
            "{field} must be 16 to {MAX_CREDENTIAL_BYTES} bytes, got {}",
            v.len()
        )));
    }
    // A bearer token is one visible word: anything else could never be presented.
    if !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad(format!(
            "{field} must be visible ASCII characters without spaces"
        )));
    }
    Ok(())
}

pub(crate) async fn install(
    State(st): State<Shared>,
    Params(site): Params<String>,
    body: Result<Json<PeerCredentials>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    if site == st.site {
        return Err(ApiError::bad(format!(
            "site {site} is this agent's own site: peer credentials are for another site"
        )));
    }
    if req.inbound.is_none() && req.outbound.is_none() {
        return Err(ApiError::bad("give inbound, outbound or both"));
    }
    if let Some(t) = &req.inbound {
        if t.expose() == st.token.expose() {
            return Err(ApiError::bad(
                "inbound must not be this agent's controller token: a peer gets its own",
            ));
        }
        check("inbound", t)?;
    }
    if let Some(t) = &req.outbound {
        check("outbound", t)?;
    }
    let mut answer = PeerCredentialsResult {
        site: site.clone(),
        ..Default::default()
    };
    if let Some(t) = req.inbound {
        let (st2, site2) = (st.clone(), site.clone());
        answer.inbound_changed = tokio::task::spawn_blocking(move || {
            let mut i = st2
                .installed
                .write()
                .map_err(|_| ApiError::internal("peer credentials poisoned"))?;
            i.install(&site2, t.expose()).map_err(ApiError::io)
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
        if answer.inbound_changed {
            tracing::info!(peer = %site, "inbound peer credential installed");
        }
    }
    if let Some(t) = req.outbound {
        let site2 = site.clone();
        answer.outbound_vms = with_store(&st, move |s| {
            let mut n = 0;
            for vm in s.names() {
                let changed = s.write_vm(&vm, |r| {
                    match r.meta.outbound.as_mut() {
                        Some(o) if o.peer_site == site2 && o.peer_token != t => {
                            o.peer_token = t.clone();
                        }
                        _ => return Ok(false),
                    }
                    r.save()?;
                    Ok(true)
                });
                match changed {
                    Ok(true) => n += 1,
                    Ok(false) => {}
                    // A VM deleted meanwhile replicates nowhere.
                    Err(e) if e.kind == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(n)
        })
        .await?;
        if answer.outbound_vms > 0 {
            tracing::info!(peer = %site, vms = answer.outbound_vms, "outbound peer credential replaced");
        }
    }
    Ok(Json(answer).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any string as a credential (made-up, short, long, with spaces or control
        /// characters): taken exactly when it is 16 to 1024 visible ASCII characters,
        /// otherwise a 400 naming the field.
        #[test]
        fn a_credential_is_taken_only_when_it_could_be_presented(
            s in prop_oneof![
                ".{0,40}",
                "[!-~]{0,1100}",
                "[ -~]{10,30}",
            ]
        ) {
            let got = check("inbound", &Secret::from(s.as_str()));
            let want = (16..=MAX_CREDENTIAL_BYTES).contains(&s.len())
                && s.bytes().all(|b| b.is_ascii_graphic());
            prop_assert_eq!(got.is_ok(), want, "{:?}", s);
            if let Err(e) = got {
                prop_assert_eq!(e.kind, ErrorKind::BadRequest);
                prop_assert!(e.message.starts_with("inbound"));
            }
        }
    }
}
