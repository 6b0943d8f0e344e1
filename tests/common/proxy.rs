//! A TCP proxy a test can cut and restore, to take a dependency away from the service without
//! touching the shared PostgreSQL or Redis server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct TcpProxy {
    pub address: SocketAddr,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    freezes: watch::Sender<u64>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Forwards connections on a fresh local port to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let open = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0u64);
        let (freezes, _) = watch::channel(0u64);
        let accept_open = open.clone();
        let accept_cuts = cuts.clone();
        let accept_freezes = freezes.clone();
        let accept_loop = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accept_open.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut = accept_cuts.subscribe();
                let mut freeze = accept_freezes.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let frozen = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                        _ = cut.changed() => false,
                        _ = freeze.changed() => true,
                    };
                    if frozen {
                        // Half-open: both sockets stay open and nothing crosses any more.
                        let _ = cut.changed().await;
                    }
                });
            }
        });
        TcpProxy {
            address,
            open,
            cuts,
            freezes,
            accept_loop,
        }
    }

    /// Every open connection goes silent without being closed, as when the peer vanished
    /// without a reset (a half-open connection); new connections are forwarded as before.
    pub fn freeze(&self) {
        self.freezes.send_modify(|generation| *generation += 1);
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|generation| *generation += 1);
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept_loop.abort();
    }
}
