{{/*
Envoy's configuration (templates/envoy.yaml puts it in a ConfigMap and its
checksum on the pods). Same listeners and routes as deploy/envoy/envoy.yaml.
*/}}
{{- define "chatfleet.envoyHealthCheck" -}}
- timeout: {{ .timeout }}
  interval: {{ .interval }}
  unhealthy_threshold: {{ .unhealthyThreshold }}
  healthy_threshold: 1
  no_traffic_interval: {{ .interval }}
  http_health_check: { path: /readyz }
{{- end -}}

{{- define "chatfleet.envoyConfig" -}}
{{- $fullname := include "chatfleet.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $hc := .Values.envoy.healthCheck }}
{{- $limits := .Values.envoy.limits }}
{{- /* Loopback only: the admin API can drain, quit and change log levels. The ops
listener relays GET /ready and GET /stats/prometheus to it for probes and scrapes. */}}
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: {{ .Values.envoy.ports.admin }} }
overload_manager:
  resource_monitors:
    - name: envoy.resource_monitors.global_downstream_max_connections
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
        max_active_downstream_connections: {{ int $limits.maxConnections }}
static_resources:
  listeners:
    - name: public
      address:
        socket_address: { address: 0.0.0.0, port_value: {{ .Values.envoy.ports.public }} }
      per_connection_buffer_limit_bytes: 65536
      filter_chains:
        - filters:
            - name: envoy.filters.network.connection_limit
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit
                stat_prefix: public_connections
                max_connections: {{ int $limits.maxPublicConnections }}
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: public
                codec_type: AUTO
                use_remote_address: true
                xff_num_trusted_hops: 0
                normalize_path: true
                merge_slashes: true
                path_with_escaped_slashes_action: REJECT_REQUEST
                request_headers_timeout: 10s
                stream_idle_timeout: 300s
                common_http_protocol_options:
                  idle_timeout: 3600s
                  headers_with_underscores_action: REJECT_REQUEST
                upgrade_configs:
                  - upgrade_type: websocket
                    enabled: false
                access_log: &access_log
                  - name: envoy.access_loggers.stdout
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
                      log_format:
                        json_format:
                          time: "%START_TIME%"
                          method: "%REQ(:METHOD)%"
                          path: "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%"
                          protocol: "%PROTOCOL%"
                          status: "%RESPONSE_CODE%"
                          flags: "%RESPONSE_FLAGS%"
                          bytes_received: "%BYTES_RECEIVED%"
                          bytes_sent: "%BYTES_SENT%"
                          duration_ms: "%DURATION%"
                          client: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"
                          upstream: "%UPSTREAM_HOST%"
                          request_id: "%REQ(X-REQUEST-ID)%"
                        formatters:
                          - name: envoy.formatter.req_without_query
                            typed_config:
                              "@type": type.googleapis.com/envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery
                route_config:
                  name: public
                  virtual_hosts:
                    - name: chatfleet
                      domains: ["*"]
                      routes:
                        - name: chat-messages-post
                          match:
                            path: /chat/messages
                            headers:
                              - name: ":method"
                                string_match: { exact: POST }
                          route:
                            cluster: chatpersistence_public
                            timeout: 15s
                          typed_per_filter_config:
                            envoy.filters.http.local_ratelimit:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
                              stat_prefix: chat_messages_post
                              token_bucket: { max_tokens: {{ int $limits.postBurst }}, tokens_per_fill: {{ int $limits.postPerSecond }}, fill_interval: 1s }
                              filter_enabled:
                                default_value: { numerator: 100, denominator: HUNDRED }
                              filter_enforced:
                                default_value: { numerator: 100, denominator: HUNDRED }
                              response_headers_to_add:
                                - header: { key: retry-after, value: "1" }
                              rate_limits:
                                - actions:
                                    - remote_address: {}
                              descriptors:
                                - entries:
                                    - key: remote_address
                                  token_bucket: { max_tokens: {{ int $limits.postPerIpBurst }}, tokens_per_fill: {{ int $limits.postPerIpPerSecond }}, fill_interval: 1s }
                              max_dynamic_descriptors: {{ int $limits.maxTrackedClients }}
                        - name: chat-messages
                          match: { path: /chat/messages }
                          route:
                            cluster: chatpersistence_public
                            timeout: 15s
                        # Everything else of the API: a message's edit, deletion and reactions,
                        # and the conversations (groups, the inbox, read markers).
                        - name: chat-message-changes
                          match: { prefix: /chat/messages/ }
                          route:
                            cluster: chatpersistence_public
                            timeout: 15s
                        - name: chat-conversations
                          match: { path: /chat/conversations }
                          route:
                            cluster: chatpersistence_public
                            timeout: 15s
                        - name: chat-conversation
                          match: { prefix: /chat/conversations/ }
                          route:
                            cluster: chatpersistence_public
                            timeout: 15s
                        - name: chat-subscribe
                          match: { path: /chat/subscribe }
                          route:
                            cluster: chatwebsocketshandler_public
                            hash_policy:
                              - query_parameter: { name: stream_id }
                              # a group subscribes with conversation_id (never both: 400); only one
                              # parameter is present, so the key is the same as the forwards' stream_id
                              - query_parameter: { name: conversation_id }
                            upgrade_configs:
                              - upgrade_type: websocket
                                enabled: true
                            timeout: 0s
                            idle_timeout: {{ .Values.envoy.socketIdleTimeout }}
                            retry_policy: &connect_retry
                              retry_on: connect-failure,refused-stream,reset-before-request
                              num_retries: 2
                              retry_host_predicate:
                                - name: envoy.retry_host_predicates.previous_hosts
                                  typed_config:
                                    "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
                              host_selection_retry_max_attempts: 5
                        - name: notifications-subscribe
                          match: { path: /notifications/subscribe }
                          route:
                            cluster: generalnotificationshandler_public
                            hash_policy:
                              - query_parameter: { name: user_id }
                            upgrade_configs:
                              - upgrade_type: websocket
                                enabled: true
                            timeout: 0s
                            idle_timeout: {{ .Values.envoy.socketIdleTimeout }}
                            retry_policy: *connect_retry
                        - name: presence
                          match: { path: /presence }
                          route:
                            cluster: chatpersistence_public
                            timeout: 5s
                        - name: not-found
                          match: { prefix: / }
                          direct_response:
                            status: 404
                            body:
                              inline_string: '{"error":{"code":"not_found","message":"no such route"}}'
                http_filters:
                  - name: envoy.filters.http.local_ratelimit
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
                      stat_prefix: public_ratelimit
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    - name: internal
      address:
        socket_address: { address: 0.0.0.0, port_value: {{ .Values.envoy.ports.internal }} }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: internal
                codec_type: AUTO
                normalize_path: true
                merge_slashes: true
                request_headers_timeout: 10s
                common_http_protocol_options:
                  idle_timeout: 300s
                access_log: *access_log
                route_config:
                  name: internal
                  virtual_hosts:
                    - name: chatfleet-internal
                      domains: ["*"]
                      routes:
                        - name: chat-forward
                          match: { path: /chat/forward-to-websocket }
                          route:
                            cluster: chatwebsocketshandler_internal
                            hash_policy:
                              - query_parameter: { name: stream_id }
                            timeout: 10s
                            retry_policy: *connect_retry
                        - name: chat-forward-event
                          match: { path: /chat/forward-event }
                          route:
                            cluster: chatwebsocketshandler_internal
                            hash_policy:
                              - query_parameter: { name: stream_id }
                            timeout: 10s
                            retry_policy: *connect_retry
                        - name: chat-close-stream
                          match: { path: /chat/close-stream }
                          route:
                            cluster: chatwebsocketshandler_internal
                            hash_policy:
                              - query_parameter: { name: stream_id }
                            timeout: 10s
                            retry_policy: *connect_retry
                        - name: notifications
                          match: { prefix: /notifications/ }
                          route:
                            cluster: generalnotificationshandler_internal
                            hash_policy:
                              - query_parameter: { name: user_id }
                            timeout: 10s
                            retry_policy: *connect_retry
                        - name: presence
                          match: { path: /presence }
                          route:
                            cluster: generalnotificationshandler_internal
                            hash_policy:
                              - query_parameter: { name: user_id }
                            timeout: 5s
                        - name: chat-history
                          match: { path: /chat/messages }
                          route:
                            cluster: chatpersistence_internal
                            timeout: 15s
                        - name: chat-changes
                          match: { path: /chat/messages/changes }
                          route:
                            cluster: chatpersistence_internal
                            timeout: 15s
                        - name: group-members
                          match:
                            safe_regex: { regex: '^/chat/conversations/[^/]+/members$' }
                            headers:
                              - name: ':method'
                                string_match: { exact: GET }
                          route:
                            cluster: chatpersistence_internal
                            timeout: 15s
                        - name: not-found
                          match: { prefix: / }
                          direct_response:
                            status: 404
                            body:
                              inline_string: '{"error":{"code":"not_found","message":"no such route"}}'
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    - name: ops
      address:
        socket_address: { address: 0.0.0.0, port_value: {{ .Values.envoy.ports.ops }} }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ops
                codec_type: AUTO
                request_headers_timeout: 10s
                route_config:
                  name: ops
                  virtual_hosts:
                    - name: ops
                      domains: ["*"]
                      routes:
                        - name: ready
                          match:
                            path: /ready
                            headers: &get_only
                              - name: ":method"
                                string_match: { exact: GET }
                          route: { cluster: envoy_admin, timeout: 2s }
                        - name: stats
                          match:
                            path: /stats/prometheus
                            headers: *get_only
                          route: { cluster: envoy_admin, timeout: 5s }
                        - name: not-found
                          match: { prefix: / }
                          direct_response: { status: 404 }
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: envoy_admin
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: envoy_admin
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: { address: 127.0.0.1, port_value: {{ .Values.envoy.ports.admin }} }
    {{- range $side, $port := dict "public" .Values.ports.public "internal" .Values.ports.internal }}
    - name: chatpersistence_{{ $side }}
      type: STRICT_DNS
      dns_lookup_family: V4_ONLY
      connect_timeout: 1s
      lb_policy: ROUND_ROBIN
      health_checks:
        {{- include "chatfleet.envoyHealthCheck" $hc | nindent 8 }}
      load_assignment:
        cluster_name: chatpersistence_{{ $side }}
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: { address: {{ include "chatfleet.svcHost" (dict "root" $ "name" "chatpersistence-headless") }}, port_value: {{ $port }} }
                  health_check_config: { port_value: {{ $.Values.ports.public }} }
    {{- end }}
    {{- range $key, $cluster := dict "chatsockets" "chatwebsocketshandler" "notifications" "generalnotificationshandler" }}
    {{- range $side, $port := dict "public" $.Values.ports.public "internal" $.Values.ports.internal }}
    - name: {{ $cluster }}_{{ $side }}
      type: STRICT_DNS
      dns_lookup_family: V4_ONLY
      connect_timeout: 1s
      lb_policy: RING_HASH
      ring_hash_lb_config: { minimum_ring_size: 1024, hash_function: XX_HASH }
      common_lb_config:
        healthy_panic_threshold: { value: 0 }
      health_checks:
        {{- include "chatfleet.envoyHealthCheck" $hc | nindent 8 }}
      load_assignment:
        cluster_name: {{ $cluster }}_{{ $side }}
        endpoints:
          - lb_endpoints:
              {{- range $i := until (int (index $.Values $key).ringSize) }}
              {{- $pod := printf "%s-%s-%d" $fullname $key $i }}
              - endpoint:
                  address:
                    socket_address: { address: {{ printf "%s.%s-%s-headless.%s.svc.cluster.local" $pod $fullname $key $ns }}, port_value: {{ $port }} }
                  hostname: {{ $pod }}
                  health_check_config: { port_value: {{ $.Values.ports.public }} }
                metadata:
                  filter_metadata:
                    envoy.lb: { hash_key: {{ $pod }} }
              {{- end }}
    {{- end }}
    {{- end }}
{{- end -}}
