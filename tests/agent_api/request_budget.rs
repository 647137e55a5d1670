//! What a caller can make an agent hold at once: request bodies in flight over every route
//! fit `--max-inflight-body-bytes` (503 with the reason beyond, before the body is read), and
//! `/healthz` and `/metrics`, which need no token, take no body.

use crate::common_agent;

use std::time::{Duration, Instant};

use common_agent::{AgentProc, TOKEN};
use tokio::io::AsyncWriteExt;
use twinsite::site::SiteProvider;

const MIB: usize = 1 << 20;

#[tokio::test]
async fn bodies_in_flight_fit_the_budget_and_open_routes_take_none() {
    let root = tempfile::tempdir().unwrap();
    let budget = (2 * MIB).to_string();
    let a = AgentProc::start_with(
        "primary",
        root.path(),
        &[],
        &["--max-inflight-body-bytes", &budget],
    );
    let ca = a.client();
    ca.create_vm("web-01", &common_agent::vm_spec(4 << 20, true))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let write = |len: usize| {
        http.put(format!("{}/v1/vms/web-01/disks/disk0/data?offset=0", a.url))
            .bearer_auth(TOKEN)
            .body(vec![7u8; len])
            .send()
    };
    // A body within the budget is written.
    assert!(write(MIB).await.unwrap().status().is_success());

    // A guest write announcing the whole budget, its body sent slowly: held in flight.
    let open_slow = || async {
        let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", a.port))
            .await
            .unwrap();
        let head = format!(
            "PUT /v1/vms/web-01/disks/disk0/data?offset=0 HTTP/1.1\r\nhost: 127.0.0.1\r\n\
             authorization: Bearer {TOKEN}\r\ncontent-length: {}\r\n\r\n",
            2 * MIB
        );
        slow.write_all(head.as_bytes()).await.unwrap();
        slow.write_all(&[1u8; 1000]).await.unwrap();
        // Let the agent take its head before the next request arrives.
        tokio::time::sleep(Duration::from_millis(200)).await;
        slow
    };
    let mut slow = open_slow().await;

    // Another body does not fit: 503 naming the budget, nothing written.
    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        // On a busy machine the next write's head may reach the agent first: the slow one is
        // then the one refused (it has an answer), and is sent again.
        let mut one = [0u8; 1];
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(10), slow.peek(&mut one)).await
        {
            slow = open_slow().await;
        }
        let r = write(MIB).await.unwrap();
        if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            break r.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "never refused: {}", r.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(refused.contains("--max-inflight-body-bytes"), "{refused}");
    // Routes without a body still answer meanwhile.
    assert!(ca.list_vms().await.is_ok());
    let metrics = http.get(format!("{}/metrics", a.url)).send().await.unwrap();
    assert!(metrics.status().is_success());

    // The slow request gone, the budget is free again.
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = write(MIB).await.unwrap();
        if r.status().is_success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "budget never freed: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // /healthz and /metrics take no body.
    for route in ["/healthz", "/metrics"] {
        let r = http
            .get(format!("{}{route}", a.url))
            .body(vec![0u8; 4096])
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            reqwest::StatusCode::PAYLOAD_TOO_LARGE,
            "{route}"
        );
        let text = r.text().await.unwrap();
        assert!(text.contains("takes no request body"), "{route}: {text}");
    }
}
