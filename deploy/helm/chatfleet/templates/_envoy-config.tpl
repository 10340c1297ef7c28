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
admin:
  address:
    socket_address: { address: 0.0.0.0, port_value: {{ .Values.envoy.ports.admin }} }
static_resources:
  listeners:
    - name: public
      address:
        socket_address: { address: 0.0.0.0, port_value: {{ .Values.envoy.ports.public }} }
      per_connection_buffer_limit_bytes: 65536
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: public
                codec_type: AUTO
                use_remote_address: true
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
                access_log:
                  - name: envoy.access_loggers.stdout
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
                route_config:
                  name: public
                  virtual_hosts:
                    - name: chatfleet
                      domains: ["*"]
                      routes:
                        - name: chat-messages
                          match: { path: /chat/messages }
                          route:
                            cluster: chatpersistence_public
                            timeout: 15s
                        - name: chat-subscribe
                          match: { path: /chat/subscribe }
                          route:
                            cluster: chatwebsocketshandler_public
                            hash_policy:
                              - query_parameter: { name: stream_id }
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
                            cluster: generalnotificationshandler_public
                            hash_policy:
                              - query_parameter: { name: user_id }
                            timeout: 5s
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
                access_log:
                  - name: envoy.access_loggers.stdout
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
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
  clusters:
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
