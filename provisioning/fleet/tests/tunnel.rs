//! The fleet as tunnel gateway, end to end over real TLS on loopback: an enrolled node keeps a
//! tunnel; operators reach it through the gateway by role; refusals, exit statuses and the
//! session events come back; revocation ends the node's tunnel.

mod common;

use std::time::Duration;

use common::{Db, TestResult, enroll_request, fleet_on};
use hearth_fleet_client::enroll::enroll;
use hearth_fleet_client::https::json;
use hearth_fleet_client::tls::ClientIdentity;
use hearth_fleet_client::tunnel::{StreamReset, Tunnel, TunnelConfig, TunnelError, connect};
use hearth_proto::fleet::{EventView, NodeView};
use hearth_proto::mux::{Target, reset};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A stand-in node: echoes, answers the local API with a fixed body, ends `exec false` with exit
/// status 1 after its output, refuses everything else.
fn serve_node(mut t: Tunnel) -> tokio::task::JoinHandle<Tunnel> {
    tokio::spawn(async move {
        while let Some(inc) = t.incoming.recv().await {
            let mut s = inc.stream;
            match inc.target {
                Target::Echo => {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 32 * 1024];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = s.shutdown().await;
                    });
                }
                Target::LocalApi => {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n{\"state\":\"ready\"}").await;
                    let _ = s.shutdown().await;
                }
                Target::Exec { argv } if argv == ["false"] => {
                    let _ = s.write_all(b"some output\n").await;
                    s.flushed().await;
                    s.control().reset(reset::EXIT + 1, "exit status 1");
                }
                other => s.refuse(reset::REFUSED, &format!("{} is not served", other.label())),
            }
        }
        t
    })
}

async fn read_err(s: &mut hearth_fleet_client::tunnel::TunnelStream) -> std::io::Error {
    let mut out = Vec::new();
    match s.read_to_end(&mut out).await {
        Ok(n) => std::io::Error::other(format!("read {n} bytes, no error")),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_reach_a_node_through_the_gateway_by_role() -> TestResult {
    let Some(f) = fleet_on(Db::Sqlite).await else { return Ok(()) };
    let token = f.token(1, 600).await;
    let (req, key) = enroll_request(&token.token, 1);
    let resp = enroll(&f.ep(), &f.pin(), &req).await?;
    let node = resp.node_id.clone();
    let id = ClientIdentity { cert_pem: resp.cert_pem, key_pem: key };
    let node_tunnel = connect(&f.ep(), &f.pin(), &id, TunnelConfig::default()).await?;
    let node_handle = node_tunnel.handle.clone();
    let _served = serve_node(node_tunnel);
    for _ in 0..100 {
        if f.running.fleet.gateway.node(&node).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.running.fleet.gateway.connected(), vec![node.clone()]);

    let admin = connect(&f.ep(), &f.pin(), &f.admin, TunnelConfig::default()).await?;
    let viewer = connect(&f.ep(), &f.pin(), &f.viewer, TunnelConfig::default()).await?;
    let via = |t: Target| Target::Via { node: node.clone(), target: Box::new(t) };

    // Admin: 2 MB through node and gateway, intact.
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    let s = admin.handle.open(&via(Target::Echo))?;
    let (mut r, mut w) = tokio::io::split(s);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await?;
    writer.await??;
    assert!(back == data, "echo through the gateway: {} of {} bytes", back.len(), data.len());

    // The exit status comes back as the reset code, after the output.
    let mut s = admin.handle.open(&via(Target::Exec { argv: vec!["false".into()] }))?;
    let mut out = [0u8; 12];
    s.read_exact(&mut out).await?;
    assert_eq!(&out, b"some output\n");
    let e = read_err(&mut s).await;
    assert_eq!(StreamReset::of(&e).map(|r| r.code), Some(reset::EXIT + 1), "{e}");

    // A viewer reaches the local API but not a command.
    let mut s = viewer.handle.open(&via(Target::LocalApi))?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    assert!(body.ends_with("{\"state\":\"ready\"}"), "{body}");
    let mut s = viewer.handle.open(&via(Target::Exec { argv: vec!["id".into()] }))?;
    let e = read_err(&mut s).await;
    let r = StreamReset::of(&e).ok_or("no reset")?;
    assert_eq!(r.code, reset::REFUSED);
    assert!(r.reason.contains("exec id needs the admin role"), "{}", r.reason);

    // The node's own policy refusals reach the operator; unknown nodes are unreachable.
    let mut s = admin.handle.open(&via(Target::Port(22)))?;
    let e = read_err(&mut s).await;
    assert_eq!(StreamReset::of(&e).map(|r| r.reason.as_str()), Some("port 22 is not served"));
    let mut s = admin
        .handle
        .open(&Target::Via { node: "n-nope".into(), target: Box::new(Target::Echo) })?;
    let e = read_err(&mut s).await;
    assert_eq!(StreamReset::of(&e).map(|r| r.code), Some(reset::UNREACHABLE));

    // A node cannot open streams through the gateway (so it cannot reach other nodes).
    let mut s = node_handle.open(&via(Target::Echo))?;
    let e = read_err(&mut s).await;
    assert_eq!(StreamReset::of(&e).map(|r| r.code), Some(reset::REFUSED));

    // Every stream and refusal is an event naming operator, node and target.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events: Vec<EventView> =
        json::<(), _>(&f.ep(), f.http(Some(&f.admin)), "GET", "/v1/events?limit=100", None).await?;
    let has = |kind: &str, words: &str| {
        events.iter().any(|e| {
            e.kind == kind
                && e.message.contains(words)
                && e.node_id.as_deref() == Some(node.as_str())
        })
    };
    assert!(has("tunnel-open", "operator tester: echo"), "{events:#?}");
    assert!(has("tunnel-close", "operator tester: echo ended after"), "{events:#?}");
    assert!(has("tunnel-refused", "exec id needs the admin role"), "{events:#?}");

    // Revocation ends the node's tunnel.
    let path = format!("/v1/nodes/{node}/revoke");
    let _: NodeView = json::<(), _>(&f.ep(), f.http(Some(&f.admin)), "POST", &path, None).await?;
    let why = tokio::time::timeout(Duration::from_secs(5), node_handle.ended()).await?;
    assert!(matches!(why, TunnelError::Eof | TunnelError::Io(_)), "{why:?}");
    assert!(f.running.fleet.gateway.connected().is_empty());
    Ok(())
}
