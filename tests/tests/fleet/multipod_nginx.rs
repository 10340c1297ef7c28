//! Two socket pods of each kind behind nginx with the shipped configuration
//! (`deploy/nginx/chatfleet.conf.template` via `deploy/nginx/render.sh`): routing by
//! `stream_id` / `user_id` on the public and internal paths, and recovery when a pod
//! is killed. Needs Debian's nginx (`apt-get install nginx`; `NGINX_BIN` overrides).
//!
//! Why this test exists: it is the live proof that the consistent-hash routing the
//! design depends on works with a real proxy and real processes: a forward reaches
//! the pod that holds the stream's sockets, and losing a pod loses no message.

use crate::multipod_support::{two_pods_route_by_key_and_survive_losing_one, ProxyKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nginx_routes_streams_to_their_pod_and_survives_losing_one() {
    two_pods_route_by_key_and_survive_losing_one(ProxyKind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nginx_scale_out_moves_open_sockets_to_their_new_pods() {
    crate::multipod_support::scale_out_moves_open_sockets_to_their_new_pods(ProxyKind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nginx_routes_a_group_to_one_pod_with_its_events() {
    crate::multipod_support::groups_reach_their_pod_through_the_proxy(ProxyKind::Nginx).await;
}
