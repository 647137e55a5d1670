//! Peer credentials: one random credential per (source site, target site) pair, so that no
//! site ever holds another site's own token. The controller mints it, keeps it in a Secret of
//! its own in its secret namespace (`twinsite-peer-SOURCE-to-TARGET-HASH`, labelled
//! `twinsite.io/peer-credential`, annotated with both sites), installs it at the target's agent
//! (`PUT /v1/peer-credentials/SOURCE`, valid there only on the replica routes of VMs that
//! replicate from SOURCE) and gives it to the source's agent, in `enable` and for its running
//! replications. Deleting the Secret rotates the credential: the next Site reconcile mints a new
//! one and installs it at both agents; the old one stops working at the target at once.
//!
//! Each Site's reconcile talks to its own agent only: it installs there the inbound credential
//! of every other known site and its own outbound credential toward it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, RwLock};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

use super::rvm::Context;
use crate::secret::Secret;
use crate::site::PeerCredentials;

/// Label every pair Secret carries (value `true`).
pub const LABEL: &str = "twinsite.io/peer-credential";
/// Annotations naming the pair's sites.
pub const SOURCE_ANNOTATION: &str = "twinsite.io/source-site";
pub const TARGET_ANNOTATION: &str = "twinsite.io/target-site";
/// The Secret's key holding the credential.
pub const KEY: &str = "token";

/// What this process knows of the pairs' credentials.
#[derive(Default)]
pub struct Pairs {
    /// Per (source, target): the credential, once installed at the target's agent.
    ready: RwLock<HashMap<(String, String), Secret>>,
    /// Per (site, other site): digests of the (inbound, outbound) credentials this process
    /// installed at `site`'s agent. Forgotten when the site stops answering, so an agent that
    /// comes back (perhaps on a new data directory) gets them again.
    installed: Mutex<HashMap<(String, String), (String, String)>>,
}

impl Pairs {
    /// The credential `source`'s agent presents to `target`'s, once `target` holds it.
    pub fn credential(&self, source: &str, target: &str) -> Option<Secret> {
        let map = self.ready.read().unwrap_or_else(|e| e.into_inner());
        map.get(&(source.to_string(), target.to_string())).cloned()
    }

    /// Records that `target`'s agent holds `credential` for `source` (what `enable` sends).
    pub fn installed_at_target(&self, source: &str, target: &str, credential: Secret) {
        let mut map = self.ready.write().unwrap_or_else(|e| e.into_inner());
        map.insert((source.to_string(), target.to_string()), credential);
    }

    /// `site`'s agent may have lost what was installed (it did not answer): install again.
    pub fn forget(&self, site: &str) {
        let mut map = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|(s, _), _| s != site);
    }
}

/// The name of the Secret of the pair `source` -> `target`: readable, and unique however the
/// site names run together (a hash of both ends it).
pub fn secret_name(source: &str, target: &str) -> String {
    let h = hex::encode(Sha256::digest(format!("{source}\n{target}").as_bytes()));
    let readable = format!("twinsite-peer-{source}-to-{target}-{}", &h[..8]);
    // Secret names are DNS subdomains of at most 253 characters.
    if readable.len() <= 253 {
        readable
    } else {
        format!("twinsite-peer-{}", &h[..32])
    }
}

fn digest(s: &Secret) -> String {
    hex::encode(Sha256::digest(s.expose().as_bytes()))
}

/// A new random credential: 32 bytes from the system's generator, as hex.
fn mint() -> Result<Secret, String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| format!("no randomness for a peer credential: {e}"))?;
    Ok(hex::encode(b).into())
}

/// The pair's credential from its Secret, minted and stored first when there is none.
async fn credential(ctx: &Context, source: &str, target: &str) -> Result<Secret, String> {
    let api: Api<KubeSecret> = Api::namespaced(ctx.client.clone(), &ctx.secret_namespace);
    let name = secret_name(source, target);
    let ns = &ctx.secret_namespace;
    for _ in 0..2 {
        match api.get_opt(&name).await {
            Err(e) => return Err(format!("reading Secret {ns}/{name}: {e}")),
            Ok(Some(s)) => return value_of(&s, source, target, ns, &name),
            Ok(None) => {}
        }
        let token = mint()?;
        let s: KubeSecret = KubeSecret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([
                    (LABEL.to_string(), "true".to_string()),
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        "twinsite".to_string(),
                    ),
                ])),
                annotations: Some(BTreeMap::from([
                    (SOURCE_ANNOTATION.to_string(), source.to_string()),
                    (TARGET_ANNOTATION.to_string(), target.to_string()),
                ])),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(
                KEY.to_string(),
                ByteString(token.expose().as_bytes().to_vec()),
            )])),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &s).await {
            Ok(_) => {
                tracing::info!(source, target, secret = %name, "peer credential minted");
                return Ok(token);
            }
            // Another reconcile (the other site's) made it meanwhile: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(format!("creating Secret {ns}/{name}: {e}")),
        }
    }
    Err(format!("Secret {ns}/{name} keeps changing"))
}

fn value_of(
    s: &KubeSecret,
    source: &str,
    target: &str,
    ns: &str,
    name: &str,
) -> Result<Secret, String> {
    let ann = s.metadata.annotations.clone().unwrap_or_default();
    if ann.get(SOURCE_ANNOTATION).map(String::as_str) != Some(source)
        || ann.get(TARGET_ANNOTATION).map(String::as_str) != Some(target)
    {
        return Err(format!(
            "Secret {ns}/{name} is not the peer credential of {source} -> {target} (its \
             annotations {SOURCE_ANNOTATION} and {TARGET_ANNOTATION} name other sites)"
        ));
    }
    let v = s
        .data
        .as_ref()
        .and_then(|d| d.get(KEY))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|v| v.len() >= 32 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            format!(
                "Secret {ns}/{name} holds no credential under key {KEY}: delete it and the \
                 controller mints a new one"
            )
        })?;
    Ok(v.into())
}

/// Installs at `site`'s agent the credentials of its pairs with every other known site.
pub async fn sync(ctx: &Context, site: &str) -> Result<(), String> {
    let Some(agent) = ctx.sites.provider(site) else {
        return Ok(());
    };
    for other in ctx.sites.names() {
        if other == site {
            continue;
        }
        let inbound = credential(ctx, &other, site).await?;
        let outbound = credential(ctx, site, &other).await?;
        let want = (digest(&inbound), digest(&outbound));
        let key = (site.to_string(), other.clone());
        let done = {
            let map = ctx
                .sites
                .pairs
                .installed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            map.get(&key) == Some(&want)
        };
        if !done {
            let creds = PeerCredentials {
                inbound: Some(inbound.clone()),
                outbound: Some(outbound),
            };
            agent
                .install_peer_credentials(&other, &creds)
                .await
                .map_err(|e| format!("installing the peer credentials of {other}: {e}"))?;
            let mut map = ctx
                .sites
                .pairs
                .installed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            map.insert(key, want);
        }
        ctx.sites.pairs.installed_at_target(&other, site, inbound);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_secret_names_are_unique_and_valid() {
        let a = secret_name("x-to-y", "z");
        let b = secret_name("x", "y-to-z");
        assert_ne!(a, b);
        assert!(a.starts_with("twinsite-peer-x-to-y-to-z-"), "{a}");
        assert_ne!(secret_name("a", "b"), secret_name("b", "a"));
        let long = "s".repeat(200);
        let n = secret_name(&long, &long);
        assert!(n.len() <= 253 && n.starts_with("twinsite-peer-"), "{n}");
    }

    #[test]
    fn minted_credentials_differ_and_are_hex() {
        let (a, b) = (mint().unwrap(), mint().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
