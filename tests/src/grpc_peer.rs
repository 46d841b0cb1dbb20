//! A stand-in proxy on the gRPC protocol: opens a mapping stream with a token and records every
//! mapping it is sent, so tests can assert on exactly what a stream delivered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::proxy_service_client::ProxyServiceClient;
use proto::{GetMappingUpdateRequest, ProxyMapping, ProxyMappingUpdateType};

pub struct StreamObserver {
    received: Arc<Mutex<Vec<ProxyMapping>>>,
    initial_done: Arc<AtomicBool>,
    ended: Arc<Mutex<Option<tonic::Status>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl StreamObserver {
    /// Opens `GetMappingUpdate` as cluster `address`; `Err` is the status the open failed with.
    pub fn connect(
        grpc_url: &str,
        token: &str,
        address: &str,
        proxy_id: &str,
    ) -> Result<StreamObserver, tonic::Status> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let received = Arc::new(Mutex::new(Vec::new()));
        let initial_done = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(Mutex::new(None));
        let url = grpc_url.to_string();
        let header: tonic::metadata::MetadataValue<_> =
            format!("Bearer {token}").parse().expect("token");
        let req = GetMappingUpdateRequest {
            proxy_id: proxy_id.to_string(),
            version: "test".to_string(),
            started_at: None,
            address: address.to_string(),
            capabilities: None,
        };
        let mut stream = runtime.block_on(async {
            let mut client = ProxyServiceClient::connect(url)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let mut r = tonic::Request::new(req);
            r.metadata_mut().insert("authorization", header);
            Ok::<_, tonic::Status>(client.get_mapping_update(r).await?.into_inner())
        })?;
        let (rx, done, end) = (received.clone(), initial_done.clone(), ended.clone());
        runtime.spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(msg)) => {
                        rx.lock().expect("lock").extend(msg.mapping);
                        if msg.initial_sync_complete {
                            done.store(true, Ordering::SeqCst);
                        }
                    }
                    Ok(None) => {
                        *end.lock().expect("lock") = Some(tonic::Status::ok("stream ended"));
                        return;
                    }
                    Err(s) => {
                        *end.lock().expect("lock") = Some(s);
                        return;
                    }
                }
            }
        });
        Ok(StreamObserver {
            received,
            initial_done,
            ended,
            runtime: Some(runtime),
        })
    }

    pub fn wait_initial_sync(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.initial_done.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "no initial_sync_complete within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Domains of every CREATED/MODIFIED mapping received so far.
    pub fn domains(&self) -> Vec<String> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .filter(|m| m.r#type != ProxyMappingUpdateType::UpdateTypeRemoved as i32)
            .map(|m| m.domain.clone())
            .collect()
    }

    pub fn account_ids(&self) -> Vec<String> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .map(|m| m.account_id.clone())
            .collect()
    }

    /// How the stream ended, if it has.
    pub fn ended(&self) -> Option<tonic::Status> {
        self.ended.lock().expect("lock").clone()
    }
}

impl Drop for StreamObserver {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
