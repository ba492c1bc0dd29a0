//! Bad input gets a clear refusal and changes nothing: every registry table is dumped before and
//! after each attempt and must be identical. On SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use common::{Db, TestFleet, TestResult, enroll_request, fleet_on};
use hearth_fleet_client::enroll::enroll;
use hearth_fleet_client::https::request;
use hearth_fleet_client::session::Session;
use hearth_fleet_client::tls::ClientIdentity;

async fn refused(f: &TestFleet, body: Vec<u8>) -> (u16, String) {
    let r = request(&f.ep(), f.http(None), "POST", "/v1/enroll", Some(body))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// `POST /v1/nodes/{id}/channel` as the admin or the viewer: status and body.
async fn channel(f: &TestFleet, admin: bool, id: &str, body: &[u8]) -> (u16, String) {
    let peer = if admin { &f.admin } else { &f.viewer };
    let path = format!("/v1/nodes/{id}/channel");
    let r = request(&f.ep(), f.http(Some(peer)), "POST", &path, Some(body.to_vec()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

async fn bad_input(db: Db) -> TestResult {
    let Some(f) = fleet_on(db).await else { return Ok(()) };
    let used = f.token(1, 600).await;
    let (req, _) = enroll_request(&used.token, 1);
    let node = enroll(&f.ep(), &f.pin(), &req).await?.node_id;
    let revoked = f.token(1, 600).await;
    let _: serde_json::Value = hearth_fleet_client::https::json::<(), _>(
        &f.ep(),
        f.http(Some(&f.admin)),
        "POST",
        &format!("/v1/tokens/{}/revoke", revoked.id),
        None,
    )
    .await?;
    let expiring = f.token(1, 1).await;
    let good = f.token(1, 600).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let before = f.dump();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = {
        let body =
            |token: &str, n| serde_json::to_vec(&enroll_request(token, n).0).unwrap_or_default();
        // A CSR whose public key is swapped for another key's: the signature no longer verifies.
        let (mut mismatched, _) = enroll_request(&good.token, 20);
        let (other, _) = enroll_request(&good.token, 21);
        mismatched.csr_pem = swap_key(&mismatched.csr_pem, &other.csr_pem);
        let mut huge = enroll_request(&good.token, 22).0;
        huge.hostname = "x".repeat(100_000);
        vec![
            ("unknown token", body("no-such-token", 10), 403, "unknown enrollment token"),
            ("expired token", body(&expiring.token, 11), 403, "expired"),
            ("revoked token", body(&revoked.token, 12), 403, "was revoked"),
            ("used-up token", body(&used.token, 13), 403, "used up"),
            ("CSR key mismatch", serde_json::to_vec(&mismatched)?, 400, "key mismatch"),
            ("malformed JSON", b"{\"token\": ".to_vec(), 400, "malformed JSON body"),
            ("unknown field", b"{\"tokenn\": 1}".to_vec(), 400, "malformed JSON body"),
            ("oversized body", serde_json::to_vec(&huge)?, 413, "exceeds the 65536-byte limit"),
        ]
    };
    for (name, body, status, words) in cases {
        let (got, text) = refused(&f, body).await;
        assert_eq!(got, status, "{name}: {text}");
        assert!(text.contains(words), "{name}: {text:?} lacks {words:?}");
        assert_eq!(f.dump(), before, "{name} changed the registry");
    }

    // Moving a node to another update channel: a bad name, a missing or extra field, an unknown
    // node, a viewer. Each is refused with its reason; the node stays on `stable`.
    let cases: Vec<(&str, (u16, String), u16, &str)> = vec![
        (
            "upper-case channel",
            channel(&f, true, &node, br#"{"channel": "Beta"}"#).await,
            400,
            r#"channel \"Beta\" is not 1 to 32 of a-z, 0-9, '-'"#,
        ),
        (
            "empty channel",
            channel(&f, true, &node, br#"{"channel": ""}"#).await,
            400,
            "not 1 to 32",
        ),
        (
            "33-byte channel",
            channel(&f, true, &node, br#"{"channel": "abcdefghijklmnopqrstuvwxyz0123456"}"#).await,
            400,
            "not 1 to 32",
        ),
        ("no channel field", channel(&f, true, &node, b"{}").await, 400, "missing field `channel`"),
        (
            "extra field",
            channel(&f, true, &node, br#"{"channel": "beta", "x": 1}"#).await,
            400,
            "unknown field `x`",
        ),
        (
            "unknown node",
            channel(&f, true, "n-nope", br#"{"channel": "beta"}"#).await,
            404,
            "n-nope",
        ),
        ("viewer", channel(&f, false, &node, br#"{"channel": "beta"}"#).await, 403, "needs admin"),
        (
            "token with a bad channel",
            {
                let body = br#"{"ttl_s": 600, "max_uses": 1, "channel": "no/slash"}"#.to_vec();
                let r = request(&f.ep(), f.http(Some(&f.admin)), "POST", "/v1/tokens", Some(body))
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                (r.status, String::from_utf8_lossy(&r.body).into_owned())
            },
            400,
            r#"channel \"no/slash\" is not 1 to 32"#,
        ),
    ];
    for (name, (got, text), status, words) in cases {
        assert_eq!(got, status, "{name}: {text}");
        assert!(text.contains(words), "{name}: {text:?} lacks {words:?}");
        assert_eq!(f.dump(), before, "{name} changed the registry");
    }

    // A certificate from another CA, and an expired one from ours: the handshake refuses them.
    let other = fleet_on(Db::Sqlite).await.ok_or("second fleet")?;
    let (foreign, key) = other.running.fleet.ca.operator_cert(
        "mallory",
        hearth_fleet::ca::Role::Admin,
        Duration::from_secs(3600),
    )?;
    let foreign = ClientIdentity { cert_pem: foreign.cert_pem, key_pem: key };
    let r = hearth_fleet_client::https::json::<(), serde_json::Value>(
        &f.ep(),
        f.http(Some(&foreign)),
        "GET",
        "/v1/nodes",
        None,
    )
    .await;
    assert!(r.is_err(), "a certificate from another CA was accepted");
    let (node_req, node_key) = enroll_request(&good.token, 30);
    let csr = rcgen::CertificateSigningRequestParams::from_pem(&node_req.csr_pem)?;
    let expired = f.running.fleet.ca.sign_node(
        &csr,
        "n-expired",
        Duration::from_secs(3600),
        Duration::from_secs(7200),
    )?;
    let expired = ClientIdentity { cert_pem: expired.cert_pem, key_pem: node_key };
    let s = Session::open(&f.ep(), &f.pin(), &expired, "0.1.0").await;
    assert!(s.is_err(), "an expired certificate opened a session");
    assert_eq!(f.dump(), before, "refused certificates changed the registry");
    Ok(())
}

/// Replace the SubjectPublicKeyInfo inside `csr` by the one in `other` (same key type and length).
fn swap_key(csr: &str, other: &str) -> String {
    use base64::Engine as _;
    let der = |pem: &str| {
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(b64).unwrap_or_default()
    };
    let (mut a, b) = (der(csr), der(other));
    // The P-256 SPKI is 91 bytes starting 30 59 30 13.
    let find = |d: &[u8]| d.windows(4).position(|w| w == [0x30, 0x59, 0x30, 0x13]);
    if let (Some(i), Some(j)) = (find(&a), find(&b)) {
        a[i..i + 91].copy_from_slice(&b[j..j + 91]);
    }
    let body = base64::engine::general_purpose::STANDARD.encode(&a);
    format!("-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing_on_sqlite() -> TestResult {
    bad_input(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing_on_postgres() -> TestResult {
    bad_input(Db::Postgres).await
}

async fn race(db: Db) -> TestResult {
    let Some(f) = fleet_on(db).await else { return Ok(()) };
    let t = f.token(1, 600).await;
    // Two registries (two connections) on the same database, so the database itself arbitrates.
    let second =
        tokio::task::block_in_place(|| hearth_fleet::registry::Registry::open_url(&f.url))?;
    let before = f.dump();
    let mk = |n| hearth_fleet::registry::Enrollment {
        token_hash: hearth_fleet_client::tls::sha256_hex(t.token.as_bytes()),
        hardware: enroll_request(&t.token, n).0.hardware,
        hostname: format!("race{n}"),
        gpus: vec![],
        agent_version: "0.1.0".into(),
        new_id: format!("n-race{n}"),
    };
    let (a, b) = (mk(1), mk(2));
    let first = f.running.fleet.registry.clone();
    let sign =
        |_: &str| Ok(hearth_fleet::registry::CertRecord { serial: "01".into(), not_after_ms: 1 });
    let ((ra, rb), _) = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let ha = s.spawn(|| first.enroll(&a, hearth_fleet::now_ms(), &mut { sign }));
            let hb = s.spawn(|| second.enroll(&b, hearth_fleet::now_ms(), &mut { sign }));
            ((ha.join(), hb.join()), ())
        })
    });
    let (ra, rb) = (ra.map_err(|_| "panic")?, rb.map_err(|_| "panic")?);
    let wins = [ra.is_ok(), rb.is_ok()].iter().filter(|x| **x).count();
    assert_eq!(wins, 1, "exactly one enrollment wins: {ra:?} {rb:?}");
    let loser = if ra.is_ok() { rb.err() } else { ra.err() };
    assert!(loser.is_some_and(|e| e.to_string().contains("used up")));
    let after = f.dump();
    assert_eq!(after["nodes"].len(), before["nodes"].len() + 1);
    assert_eq!(after["events"].len(), before["events"].len() + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_single_use_enrollments_one_wins_on_sqlite() -> TestResult {
    race(Db::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_single_use_enrollments_one_wins_on_postgres() -> TestResult {
    race(Db::Postgres).await
}
