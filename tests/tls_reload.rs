//! TLS and mTLS listeners (an enforcement point identified by its client certificate's URI
//! SAN), and policy reload with last-known-good fallback, against the real server.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::time::Duration;

use common::{TestServer, config_from, dev_token, example_config, make_pki, repo};
use serde_json::{Value, json};

fn client(dir: &std::path::Path, with_identity: bool) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap();
    let mut b = reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(10));
    if with_identity {
        let mut pem = std::fs::read(dir.join("client.pem")).unwrap();
        pem.extend(std::fs::read(dir.join("client-key.pem")).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test]
async fn mtls_enforcement_point_is_identified_by_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let text = format!(
        r#"
[server]
[server.tls]
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"

[policy]
bundle = "{bundle}"

[[enforcement_points]]
name = "gateway"
mtls_uri_sans = ["spiffe://example.org/ns/edge/sa/gateway"]
"#,
        bundle = repo().join("tests/fixtures/authzen").display()
    );
    let cfg = config_from(&text, &dir.path().join("mandate.toml"), &[]);
    let s = TestServer::start(&cfg).await;
    let base = s.base.replace("http://", "https://");
    let body = json!({"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"}});

    let c = client(dir.path(), true);
    let resp = c
        .post(format!("{base}/access/v1/evaluation"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(v["decision"], true, "{v}");

    // Discovery over TLS publishes https URLs.
    let v: Value = serde_json::from_str(
        &c.get(format!("{base}/.well-known/authzen-configuration"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(v["policy_decision_point"], base.as_str());

    // Without a client certificate the handshake is refused: no decision at all.
    let anonymous = client(dir.path(), false);
    let r = anonymous
        .post(format!("{base}/access/v1/evaluation"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await;
    assert!(
        r.is_err(),
        "an mTLS listener must refuse clients without certificates"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn reload_swaps_the_bundle_and_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    common::copy_dir(&repo().join("config/policies"), &bundle);
    let bundle_s = bundle.to_str().unwrap().to_owned();
    let cfg = example_config(&[("MANDATE_POLICY__BUNDLE", &bundle_s)]);
    let s = TestServer::start(&cfg).await;
    let t = dev_token("agent-1", json!({}), Duration::from_secs(300));
    let read = json!({"action":"crm:read","resource":{"type":"CrmRecord","id":"c-1"}});
    let (_, v) = s.post("/v1/check", Some(&t), &read).await;
    assert_eq!(v["decision"], "allow", "{v}");
    let v1 = v["policy_version"].as_str().unwrap().to_owned();

    std::fs::write(
        bundle.join("freeze.cedar"),
        "@id(\"crm-freeze\")\nforbid (principal, action == Action::\"crm:read\", resource);\n",
    )
    .unwrap();
    let running = s.running.as_ref().unwrap();
    let v2 = running.reload().expect("valid bundle reloads");
    assert_ne!(&*v2, v1.as_str());
    let (_, v) = s.post("/v1/check", Some(&t), &read).await;
    assert_eq!(
        (v["decision"].clone(), v["policy_version"].clone()),
        (json!("deny"), json!(&*v2)),
        "{v}"
    );

    // A broken bundle is refused; decisions go on with the last good one.
    std::fs::write(
        bundle.join("broken.cedar"),
        "permit (principal, action, resource) when { context.nope > };\n",
    )
    .unwrap();
    let err = running.reload().unwrap_err().to_string();
    assert!(err.contains("broken.cedar"), "{err}");
    let (_, v) = s.post("/v1/check", Some(&t), &read).await;
    assert_eq!(
        (v["decision"].clone(), v["policy_version"].clone()),
        (json!("deny"), json!(&*v2)),
        "{v}"
    );
    s.shutdown().await;
}
