;; A WASI preview2 command component that connects to 127.0.0.1:7007 over
;; wasi:sockets, writes a line to it and returns ok; any failure (no network
;; granted, nothing listening) returns err.
(component $C
  (import "wasi:io/error@0.2.0" (instance $io-error
    (export "error" (type (sub resource)))))
  (alias export $io-error "error" (type $error))
  (import "wasi:io/poll@0.2.0" (instance $poll
    (export "pollable" (type $p (sub resource)))
    (export "[method]pollable.block" (func (param "self" (borrow $p))))))
  (alias export $poll "pollable" (type $pollable))
  (import "wasi:io/streams@0.2.0" (instance $streams
    (alias outer $C $error (type $e))
    (export "input-stream" (type $is (sub resource)))
    (export "output-stream" (type $os (sub resource)))
    (type $stream-error (variant (case "last-operation-failed" (own $e)) (case "closed")))
    (export "stream-error" (type $se (eq $stream-error)))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" (borrow $os)) (param "contents" (list u8))
            (result (result (error $se)))))))
  (alias export $streams "input-stream" (type $input-stream))
  (alias export $streams "output-stream" (type $output-stream))
  (import "wasi:sockets/network@0.2.0" (instance $network
    (export "network" (type (sub resource)))
    (type $ec (enum "unknown" "access-denied" "not-supported" "invalid-argument"
      "out-of-memory" "timeout" "concurrency-conflict" "not-in-progress"
      "would-block" "invalid-state" "new-socket-limit" "address-not-bindable"
      "address-in-use" "remote-unreachable" "connection-refused"
      "connection-reset" "connection-aborted" "datagram-too-large"
      "name-unresolvable" "temporary-resolver-failure"
      "permanent-resolver-failure"))
    (export "error-code" (type (eq $ec)))
    (type $af (enum "ipv4" "ipv6"))
    (export "ip-address-family" (type (eq $af)))
    (type $v4 (tuple u8 u8 u8 u8))
    (export "ipv4-address" (type $ipv4 (eq $v4)))
    (type $v6 (tuple u16 u16 u16 u16 u16 u16 u16 u16))
    (export "ipv6-address" (type $ipv6 (eq $v6)))
    (type $v4sa (record (field "port" u16) (field "address" $ipv4)))
    (export "ipv4-socket-address" (type $ipv4sa (eq $v4sa)))
    (type $v6sa (record (field "port" u16) (field "flow-info" u32)
      (field "address" $ipv6) (field "scope-id" u32)))
    (export "ipv6-socket-address" (type $ipv6sa (eq $v6sa)))
    (type $sa (variant (case "ipv4" $ipv4sa) (case "ipv6" $ipv6sa)))
    (export "ip-socket-address" (type (eq $sa)))))
  (alias export $network "network" (type $net))
  (alias export $network "error-code" (type $error-code))
  (alias export $network "ip-address-family" (type $family))
  (alias export $network "ip-socket-address" (type $sockaddr))
  (import "wasi:sockets/instance-network@0.2.0" (instance $instance-network
    (alias outer $C $net (type $n))
    (export "instance-network" (func (result (own $n))))))
  (import "wasi:sockets/tcp@0.2.0" (instance $tcp
    (alias outer $C $net (type $n))
    (alias outer $C $error-code (type $ec))
    (alias outer $C $sockaddr (type $sa))
    (alias outer $C $pollable (type $p))
    (alias outer $C $input-stream (type $is))
    (alias outer $C $output-stream (type $os))
    (export "tcp-socket" (type $s (sub resource)))
    (export "[method]tcp-socket.start-connect"
      (func (param "self" (borrow $s)) (param "network" (borrow $n))
            (param "remote-address" $sa) (result (result (error $ec)))))
    (type $pair (tuple (own $is) (own $os)))
    (export "[method]tcp-socket.finish-connect"
      (func (param "self" (borrow $s)) (result (result $pair (error $ec)))))
    (export "[method]tcp-socket.subscribe"
      (func (param "self" (borrow $s)) (result (own $p))))))
  (alias export $tcp "tcp-socket" (type $tcp-socket))
  (import "wasi:sockets/tcp-create-socket@0.2.0" (instance $tcp-create
    (alias outer $C $error-code (type $ec))
    (alias outer $C $family (type $af))
    (alias outer $C $tcp-socket (type $s))
    (export "create-tcp-socket"
      (func (param "address-family" $af) (result (result (own $s) (error $ec)))))))

  (core module $Memory (memory (export "memory") 1))
  (core instance $memory (instantiate $Memory))
  (alias core export $memory "memory" (core memory $mem))
  (core func $instance-network (canon lower (func $instance-network "instance-network")))
  (core func $create (canon lower (func $tcp-create "create-tcp-socket") (memory $mem)))
  (core func $start-connect
    (canon lower (func $tcp "[method]tcp-socket.start-connect") (memory $mem)))
  (core func $finish-connect
    (canon lower (func $tcp "[method]tcp-socket.finish-connect") (memory $mem)))
  (core func $subscribe (canon lower (func $tcp "[method]tcp-socket.subscribe")))
  (core func $block (canon lower (func $poll "[method]pollable.block")))
  (core func $write
    (canon lower (func $streams "[method]output-stream.blocking-write-and-flush")
      (memory $mem)))
  (core module $Main
    (import "env" "memory" (memory 1))
    (import "host" "instance-network" (func $instance-network (result i32)))
    (import "host" "create" (func $create (param i32 i32)))
    ;; self, network, the address variant flattened (case, then 11 slots
    ;; wide enough for ipv6), where the result goes
    (import "host" "start-connect" (func $start-connect
      (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32)))
    (import "host" "finish-connect" (func $finish-connect (param i32 i32)))
    (import "host" "subscribe" (func $subscribe (param i32) (result i32)))
    (import "host" "block" (func $block (param i32)))
    (import "host" "write" (func $write (param i32 i32 i32 i32)))
    (data (i32.const 16) "hello from a wasm socket\n")
    ;; Results (a case byte, then the payload at +4) go at 256, 272, 288, 304.
    (func (export "run") (result i32)
      (local $net i32) (local $sock i32) (local $out i32)
      (local.set $net (call $instance-network))
      ;; ipv4
      (call $create (i32.const 0) (i32.const 256))
      (if (i32.load8_u (i32.const 256)) (then (return (i32.const 1))))
      (local.set $sock (i32.load (i32.const 260)))
      ;; ipv4 127.0.0.1 port 7007
      (call $start-connect (local.get $sock) (local.get $net)
        (i32.const 0) (i32.const 7007)
        (i32.const 127) (i32.const 0) (i32.const 0) (i32.const 1)
        (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
        (i32.const 272))
      (if (i32.load8_u (i32.const 272)) (then (return (i32.const 1))))
      (call $block (call $subscribe (local.get $sock)))
      (call $finish-connect (local.get $sock) (i32.const 288))
      (if (i32.load8_u (i32.const 288)) (then (return (i32.const 1))))
      ;; (input-stream, output-stream)
      (local.set $out (i32.load (i32.const 296)))
      (call $write (local.get $out) (i32.const 16) (i32.const 25) (i32.const 304))
      (if (i32.load8_u (i32.const 304)) (then (return (i32.const 1))))
      ;; result::ok
      (i32.const 0)))
  (core instance $main (instantiate $Main
    (with "env" (instance $memory))
    (with "host" (instance
      (export "instance-network" (func $instance-network))
      (export "create" (func $create))
      (export "start-connect" (func $start-connect))
      (export "finish-connect" (func $finish-connect))
      (export "subscribe" (func $subscribe))
      (export "block" (func $block))
      (export "write" (func $write))))))
  (func $run (result (result)) (canon lift (core func $main "run")))
  (instance $run-instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run-instance)))
