//! What a Site can make the controller read and send: only Secrets labelled for that Site
//! (`twinsite.io/site: <site>`) are read, so whoever writes a Site cannot have the controller
//! send the webhook key, another Site's token or a peer credential to a URL of their choosing.
//! Against the real API server and controller, with a listener standing in for the hostile URL.

use crate::common;
use crate::hostile;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::io::AsyncReadExt;
use twinsite::api::Site;

/// A listener that counts connections and keeps every byte sent to it, answering nothing.
struct Hostile {
    url: String,
    connections: Arc<AtomicUsize>,
    received: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Hostile {
    async fn start() -> Hostile {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, r) = (connections.clone(), received.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        r.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Hostile {
            url,
            connections,
            received,
        }
    }

    fn saw(&self, needle: &str) -> bool {
        let r = self.received.lock().unwrap();
        String::from_utf8_lossy(&r).contains(needle)
    }
}

async fn create_secret(w: &World, name: &str, labels: serde_json::Value, data: serde_json::Value) {
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), &w.ns);
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "stringData": data,
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
}

async fn create_site(w: &World, name: &str, agent: serde_json::Value) {
    let site: Site = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "Site",
        "metadata": {"name": name},
        "spec": {"agent": agent},
    }))
    .unwrap();
    Api::<Site>::all(w.client.clone())
        .create(&PostParams::default(), &site)
        .await
        .unwrap();
}

fn ready_message(s: &Site) -> String {
    s.status
        .as_ref()
        .and_then(|st| st.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// A Site naming a Secret not labelled for it (the webhook signing key, another Site's token,
/// a CA of nobody's) is not Ready, with reason `SecretNotForSite` and a message naming the
/// field and the label to set; nothing is sent to its URL. Labelling the Secret for the Site is
/// what makes the controller use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_reads_only_secrets_labelled_for_it() {
    let _serial = one_at_a_time().await;
    let w = World::start("sitesecrets").await;
    let p = w.primary.site.clone();
    // The World's Sites name Secrets labelled for them: they connect.
    wait_site_ready(&w, &p, "True", "Connected").await;
    let hostile = Hostile::start().await;
    let ref_ = |name: &str, key: &str| json!({"namespace": w.ns, "name": name, "key": key});

    // The webhook signing key: labelled for no Site.
    create_secret(
        &w,
        "hook-key",
        json!({}),
        json!({"token": "webhook-hmac-key"}),
    )
    .await;
    let thief = format!("{p}-thief");
    create_site(
        &w,
        &thief,
        json!({"url": hostile.url, "insecure": true, "tokenSecretRef": ref_("hook-key", "token")}),
    )
    .await;
    // Another Site's token: labelled for the primary, not for this Site.
    let borrower = format!("{p}-borrower");
    create_site(
        &w,
        &borrower,
        json!({"url": hostile.url, "insecure": true,
            "tokenSecretRef": ref_(&format!("{p}-agent"), "token")}),
    )
    .await;
    // Its own token, but a CA Secret labelled for no Site.
    let ca_site = format!("{p}-ca");
    create_secret(
        &w,
        "ca-site-token",
        json!({"twinsite.io/site": ca_site}),
        json!({"token": "ca-site-token-value"}),
    )
    .await;
    create_secret(&w, "stray-ca", json!({}), json!({"ca.crt": "not a CA"})).await;
    create_site(
        &w,
        &ca_site,
        json!({"url": hostile.url.replace("http://", "https://"),
            "tokenSecretRef": ref_("ca-site-token", "token"),
            "caSecretRef": ref_("stray-ca", "ca.crt")}),
    )
    .await;

    for (site, field, secret) in [
        (&thief, "spec.agent.tokenSecretRef", "hook-key"),
        (
            &borrower,
            "spec.agent.tokenSecretRef",
            &format!("{p}-agent"),
        ),
        (&ca_site, "spec.agent.caSecretRef", "stray-ca"),
    ] {
        let s = wait_site_ready(&w, site, "False", "SecretNotForSite").await;
        let m = ready_message(&s);
        assert!(
            m.contains(field)
                && m.contains(secret)
                && m.contains(&format!("twinsite.io/site={site}")),
            "{site}: {m}"
        );
    }
    assert_eq!(
        hostile.connections.load(Ordering::SeqCst),
        0,
        "the controller called the URL of a Site whose Secret is not labelled for it"
    );
    assert!(!w.controller.log().contains("webhook-hmac-key"));

    // Labelled for the Site, the Secret is used: the listener now gets the token (it answers
    // nothing, so the Site stays not Ready, but no longer for its Secret).
    Api::<Secret>::namespaced(w.client.clone(), &w.ns)
        .patch(
            "hook-key",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"twinsite.io/site": thief}}})),
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + LONG;
    while !hostile.saw("webhook-hmac-key") {
        assert!(
            std::time::Instant::now() < deadline,
            "the labelled Secret was never used"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    // The primary was never disturbed.
    wait_site_ready(&w, &p, "True", "Connected").await;
}

fn condition(s: &Site, t: &str) -> Option<(String, String, String)> {
    s.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// A Site on plain http says so: `Insecure` True (`PlainHTTP`) while `spec.agent.insecure` lets
/// it; the API server refuses to drop `insecure` while the URL is http://, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_site_is_allowed_only_when_insecure_and_shows_it() {
    let _serial = one_at_a_time().await;
    let w = World::start("insecure").await;
    let p = w.primary.site.clone();
    let s = wait_site_ready(&w, &p, "True", "Connected").await;
    let (status, reason, message) = condition(&s, "Insecure").expect("no Insecure condition");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "PlainHTTP"));
    assert!(message.contains("spec.agent.insecure"), "{message}");

    let err = Api::<Site>::all(w.client.clone())
        .patch(
            &p,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"agent": {"insecure": false}}})),
        )
        .await
        .expect_err("an http Site without insecure was accepted");
    assert!(
        err.to_string().contains(
            "spec.agent.url is http://: use an https:// URL, or set spec.agent.insecure: true"
        ),
        "{err}"
    );
}

/// An agent URL whose answer is an error with an endless body: the controller reads only its
/// start, and the Site's Ready message shows at most a few hundred characters of it, with the
/// Site's token (which the answer echoes) redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_error_answer_is_read_only_by_its_start() {
    let _serial = one_at_a_time().await;
    let w = World::start("endless").await;
    let token = "endless-site-token-0123456789";
    let agent = hostile::endless_error(&format!("agent refuses {token} because")).await;
    let site = format!("{}-endless", w.primary.site);
    create_secret(
        &w,
        "endless-token",
        json!({"twinsite.io/site": site}),
        json!({"token": token}),
    )
    .await;
    create_site(
        &w,
        &site,
        json!({"url": agent.url, "insecure": true,
            "tokenSecretRef": {"namespace": w.ns, "name": "endless-token", "key": "token"}}),
    )
    .await;
    let deadline = std::time::Instant::now() + LONG;
    let message = loop {
        let s = Api::<Site>::all(w.client.clone()).get(&site).await.unwrap();
        let m = ready_message(&s);
        if m.contains("agent refuses") {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the Site never showed the answer: {:?}",
            s.status
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    assert!(
        message.contains("agent refuses [redacted] because"),
        "{message}"
    );
    assert!(message.len() < 1000, "{} bytes", message.len());
    assert!(!w.controller.log().contains(token), "the token was logged");
    let sent = agent.sent.load(Ordering::SeqCst);
    assert!(sent < 32 << 20, "{sent} bytes were read from the agent");
}
