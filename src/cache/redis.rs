//! The Redis tier: one multiplexed connection (`ConnectionManager`, reconnecting on its own) or a
//! cluster connection; short per-command deadlines so a slow Redis costs at most that much.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use tokio::sync::RwLock;

use super::{CacheError, VerdictStore};
use crate::config::{RedisConfig, redact_url};
use crate::guard::{Score, VerdictKey};

enum Conn {
    Single(ConnectionManager),
    // Connected lazily by a background task; `None` while Redis Cluster is unreachable.
    Cluster(Arc<RwLock<Option<ClusterConnection>>>),
}

/// Redis verdict tier.
pub struct RedisStore {
    conn: Conn,
    prefix: String,
    ttl_secs: u64,
    timeout: Duration,
}

impl RedisStore {
    /// Connects lazily: an unreachable Redis at start is not an error, only a miss until it answers.
    /// Must be called inside a Tokio runtime.
    pub fn connect(cfg: &RedisConfig) -> Result<Self, CacheError> {
        let timeout = Duration::from_millis(cfg.response_timeout_ms);
        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let conn = if cfg.cluster || !cfg.cluster_nodes.is_empty() {
            let nodes: Vec<String> = std::iter::once(cfg.url.clone())
                .chain(cfg.cluster_nodes.iter().cloned())
                .collect();
            let client = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(connect_timeout)
                .response_timeout(timeout)
                .build()
                .map_err(|e| CacheError::Redis(e.to_string()))?;
            let slot = Arc::new(RwLock::new(None));
            tokio::spawn(connect_cluster(client, slot.clone()));
            Conn::Cluster(slot)
        } else {
            let client = redis::Client::open(cfg.url.as_str())
                .map_err(|e| CacheError::Redis(format!("{}: {e}", redact_url(&cfg.url))))?;
            let mcfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2));
            Conn::Single(
                ConnectionManager::new_lazy_with_config(client, mcfg)
                    .map_err(|e| CacheError::Redis(e.to_string()))?,
            )
        };
        Ok(Self {
            conn,
            prefix: cfg.key_prefix.clone(),
            ttl_secs: cfg.ttl_secs,
            timeout,
        })
    }

    fn key(&self, key: &VerdictKey) -> String {
        format!("{}{}", self.prefix, key.hex())
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, CacheError> {
        let call = async {
            match &self.conn {
                Conn::Single(m) => cmd.query_async(&mut m.clone()).await,
                Conn::Cluster(slot) => {
                    let conn = slot.read().await.clone();
                    match conn {
                        Some(mut c) => cmd.query_async(&mut c).await,
                        None => Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "cluster not connected",
                        ))),
                    }
                }
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r.map_err(|e| CacheError::Redis(e.to_string())),
            Err(_) => Err(CacheError::Redis(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }
}

async fn connect_cluster(
    client: redis::cluster::ClusterClient,
    slot: Arc<RwLock<Option<ClusterConnection>>>,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        match client.get_async_connection().await {
            Ok(c) => {
                *slot.write().await = Some(c);
                tracing::info!("connected to Redis Cluster");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Redis Cluster unreachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl VerdictStore for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn get<'a>(&'a self, key: &'a VerdictKey) -> BoxFuture<'a, Result<Option<Score>, CacheError>> {
        Box::pin(async move {
            let raw: Option<String> = self.query(redis::cmd("GET").arg(self.key(key))).await?;
            raw.map(|s| serde_json::from_str(&s).map_err(|e| CacheError::Corrupt(e.to_string())))
                .transpose()
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a VerdictKey,
        score: &'a Score,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let v = serde_json::to_string(score).map_err(|e| CacheError::Corrupt(e.to_string()))?;
            self.query(
                redis::cmd("SET")
                    .arg(self.key(key))
                    .arg(v)
                    .arg("EX")
                    .arg(self.ttl_secs),
            )
            .await
        })
    }

    fn ping(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.query::<String>(&redis::cmd("PING")).await.is_ok() })
    }
}
