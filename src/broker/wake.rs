//! The Redis side of wake-ups between instances (`service::wake`): announcing on the wake
//! channel, and listening to it on a connection of its own.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use deadpool_redis::redis;
use futures_util::StreamExt;

use super::connections::Connections;
use super::Broker;
use crate::error::ApiResult;
use crate::service::wake::Announcement;

/// A subscription to the wake channel.
pub struct WakeListener {
    pubsub: redis::aio::PubSub,
    connections: Arc<Connections>,
}

impl WakeListener {
    /// The next message's text; `None` once the connection is lost.
    pub async fn next(&mut self) -> Option<String> {
        let Some(message) = self.pubsub.on_message().next().await else {
            // The shared connections went the same way; have them reconnect now rather
            // than fail one request each.
            self.connections.suspect_all();
            return None;
        };
        message.get_payload::<String>().ok().or(Some(String::new()))
    }

    /// The connection went silent (no heartbeat heard): it is dropped, and the shared
    /// connections, which most likely went the same way, reconnect too.
    pub fn abandon(self) {
        self.connections.suspect_all();
    }
}

impl Broker {
    /// This instance's id, as its announcements (and those its scripts send) name it.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Sends `announcement` to every instance (this one included).
    pub async fn announce(&self, announcement: &Announcement) -> ApiResult<()> {
        let mut connection = self.connection().await?;
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.keys.wake_channel())
            .arg(announcement.encode(&self.origin))
            .query_async(&mut connection)
            .await?;
        Ok(())
    }

    /// Opens a connection subscribed to the wake channel; on a cluster, to the next seed node
    /// in turn, so that a node that is down is passed over at the next attempt.
    pub async fn listen_for_wakes(&self) -> ApiResult<WakeListener> {
        let turn = self.next_wake_node.fetch_add(1, Ordering::Relaxed);
        let node = &self.wake_nodes[turn % self.wake_nodes.len()];
        let mut pubsub = node.get_async_pubsub().await?;
        pubsub.subscribe(self.keys.wake_channel()).await?;
        Ok(WakeListener {
            pubsub,
            connections: self.connections.clone(),
        })
    }
}
