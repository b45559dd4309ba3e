;; Waits in the host (poll_oneoff on a clock) for an hour at a time, forever:
;; an idle instance.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $again
      ;; one clock subscription at 0: userdata 0, tag 0 (clock),
      ;; id 1 (monotonic), timeout 3600 s, precision 0, flags 0 (relative)
      (i64.store (i32.const 0) (i64.const 0))
      (i32.store8 (i32.const 8) (i32.const 0))
      (i32.store (i32.const 16) (i32.const 1))
      (i64.store (i32.const 24) (i64.const 3600000000000))
      (i64.store (i32.const 32) (i64.const 0))
      (i32.store16 (i32.const 40) (i32.const 0))
      (drop (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
      (br $again))))
