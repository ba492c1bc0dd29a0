//! `netns-echo ADDR`: a TCP echo server (the workload the netns test reaches through the tunnel).

fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "0.0.0.0:7007".into());
    hearth_netns::echo_server(&addr)
}
