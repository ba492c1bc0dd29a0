//! The fleet as tunnel gateway, end to end over real TLS on loopback: an enrolled node keeps a
//! tunnel; operators reach it through the gateway by role; refusals, exit statuses and the
//! session events come back; revocation ends the node's tunnel; lanes join only with their
//! tunnel's token, carry its port streams and close with it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Db, TestResult, enroll_request, fleet_on};
use hearth_fleet::tunnel::LANES;
use hearth_fleet_client::enroll::enroll;
use hearth_fleet_client::https::json;
use hearth_fleet_client::tls::ClientIdentity;
use hearth_fleet_client::tunnel::lanes::{Lanes, Serve, connect_lane};
use hearth_fleet_client::tunnel::{
    Incoming, StreamReset, Tunnel, TunnelConfig, TunnelError, connect,
};
use hearth_proto::fleet::{EventView, NodeView};
use hearth_proto::lane::LaneMsg;
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

/// Wait up to 5 s for `cond`.
async fn wait_until(what: &str, cond: impl Fn() -> bool) -> TestResult {
    for _ in 0..250 {
        if cond() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("{what}: not within 5 s").into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_carry_port_streams_and_close_with_their_tunnel() -> TestResult {
    let Some(f) = fleet_on(Db::Sqlite).await else { return Ok(()) };
    let gw = &f.running.fleet.gateway;
    let token = f.token(1, 600).await;
    let (req, key) = enroll_request(&token.token, 1);
    let resp = enroll(&f.ep(), &f.pin(), &req).await?;
    let node = resp.node_id.clone();
    let id = ClientIdentity { cert_pem: resp.cert_pem, key_pem: key };
    let mut primary = connect(&f.ep(), &f.pin(), &id, TunnelConfig::default()).await?;

    // The gateway offers its lanes on the primary tunnel, with a token.
    let offer = tokio::time::timeout(Duration::from_secs(5), primary.control.recv())
        .await?
        .ok_or("no control message")?;
    let LaneMsg::Offer { count, token: lane_token } = LaneMsg::decode(&offer)? else {
        return Err("the first control message is not an offer".into());
    };
    assert_eq!(count, LANES);

    // A lane with another token is closed, and never joins.
    let stray = connect_lane(&f.ep(), &f.pin(), &id, [0x55; 16], TunnelConfig::default()).await?;
    let why = tokio::time::timeout(Duration::from_secs(5), stray.handle.ended()).await?;
    assert!(matches!(why, TunnelError::Eof | TunnelError::Io(_)), "{why:?}");
    assert_eq!(gw.lanes(&node), 0);

    // The node's side: the offer opens the lanes; a port stream on a lane answers "lane", the
    // primary's streams answer "primary".
    let on_lane: Serve = Arc::new(|inc: Incoming| {
        tokio::spawn(answer(inc, "lane"));
    });
    let mut lanes = Lanes::new(f.ep(), f.pin(), id.clone(), 8, on_lane);
    assert_eq!(lanes.on_control(&offer), LANES);
    let primary_handle = primary.handle.clone();
    let _served = tokio::spawn(async move {
        while let Some(inc) = primary.incoming.recv().await {
            tokio::spawn(answer(inc, "primary"));
        }
        primary
    });
    wait_until("both lanes up", || gw.lanes(&node) == usize::from(LANES)).await?;
    assert_eq!(gw.lane_total(), usize::from(LANES));

    // A lane beyond the offer's count is closed.
    let extra = connect_lane(&f.ep(), &f.pin(), &id, lane_token, TunnelConfig::default()).await?;
    let why = tokio::time::timeout(Duration::from_secs(5), extra.handle.ended()).await?;
    assert!(matches!(why, TunnelError::Eof | TunnelError::Io(_)), "{why:?}");
    assert_eq!(gw.lanes(&node), usize::from(LANES));

    // Through the gateway: port streams go to the lanes, one to each while both are open; the
    // node's API stays on the primary.
    let admin = connect(&f.ep(), &f.pin(), &f.admin, TunnelConfig::default()).await?;
    let via = |target| Target::Via { node: node.clone(), target: Box::new(target) };
    let mut a = admin.handle.open(&via(Target::Port(9)))?;
    let mut b = admin.handle.open(&via(Target::Port(9)))?;
    for s in [&mut a, &mut b] {
        s.write_all(b"hi").await?;
    }
    let mut ids = Vec::new();
    for s in [&mut a, &mut b] {
        let mut got = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .map_err(|_| "a port stream answered not as a lane")??;
        let text = std::str::from_utf8(&got)?;
        assert!(text.starts_with("lane "), "{text}");
        ids.push(text[5..].trim().to_string());
    }
    // Each lane numbers the gateway's streams from 2: the same id twice means two lanes.
    assert_eq!(ids[0], ids[1], "both port streams on one lane");
    let mut api = admin.handle.open(&via(Target::LocalApi))?;
    api.write_all(b"hi").await?;
    let mut got = [0u8; 7];
    api.read_exact(&mut got).await?;
    assert_eq!(&got, b"primary");

    // The primary ends: the gateway closes its lanes.
    primary_handle.close();
    wait_until("the lanes closed", || gw.lanes(&node) == 0).await?;
    wait_until("the tunnel gone", || gw.connected().is_empty()).await?;
    drop(lanes);
    Ok(())
}

/// Answer a stream with `label` (and, for a lane, the stream's id, padded to 4 characters), then
/// hold it open until the opener ends it.
async fn answer(inc: Incoming, label: &'static str) {
    let mut s = inc.stream;
    let reply = if label == "lane" { format!("lane {:<4}", s.id()) } else { label.to_string() };
    let _ = s.write_all(reply.as_bytes()).await;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    let _ = s.shutdown().await;
}
