;; Grows its memory 1 MiB at a time, touching every new page, until a grow
;; fails; then exits 3. Under a memory limit the instance is ended first.
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $old i32)
    (local $p i32)
    (loop $grow
      (local.set $old (memory.grow (i32.const 16)))
      (if (i32.eq (local.get $old) (i32.const -1))
        (then (call $proc_exit (i32.const 3))))
      ;; touch each 4 KiB page of the new 1 MiB
      (local.set $p (i32.mul (local.get $old) (i32.const 65536)))
      (loop $touch
        (i32.store8 (local.get $p) (i32.const 1))
        (local.set $p (i32.add (local.get $p) (i32.const 4096)))
        (br_if $touch (i32.lt_u (local.get $p)
          (i32.mul (i32.add (local.get $old) (i32.const 16)) (i32.const 65536)))))
      (br $grow))))
