//! The embedded Kafka-protocol broker: librdkafka's mock cluster, which serves produce,
//! fetch, consumer groups, transactions and `read_committed` to any Kafka client. Its
//! log lives in memory and it does not accept CreateTopics from outside, so chorus
//! creates every topology topic itself at start. `--port` puts a plain TCP forwarder on
//! a fixed port in front of it for bootstrapping; clients then follow the metadata to
//! the broker's own port.

use crate::kafka::all_topics;
use anyhow::{anyhow, Context as _, Result};
use chorus_processors::Topology;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tokio::net::{TcpListener, TcpStream};

pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedBroker {
    pub fn start(topology: &Topology) -> Result<EmbeddedBroker> {
        let cluster = MockCluster::new(1).map_err(|e| anyhow!("cannot start the embedded broker: {e}"))?;
        for topic in all_topics(topology) {
            cluster
                .create_topic(&topic.name, topic.partitions as i32, 1)
                .map_err(|e| anyhow!("cannot create topic {} on the embedded broker: {e}", topic.name))?;
        }
        Ok(EmbeddedBroker { cluster })
    }

    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<()> {
        self.cluster
            .create_topic(name, partitions as i32, 1)
            .map_err(|e| anyhow!("cannot create topic {name} on the embedded broker: {e}"))
    }

    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}

/// Accept connections on `port` and forward them to the broker.
pub async fn forward_port(port: u16, target: String) -> Result<u16> {
    let listener =
        TcpListener::bind(("127.0.0.1", port)).await.with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    let bound = listener.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { continue };
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(bound)
}
