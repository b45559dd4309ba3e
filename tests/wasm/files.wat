;; File I/O on a preopened directory: in the last preopen (the rootfs "/"
;; when there are no mounts, else the last mount), creates kuasar.txt
;; exclusively, writes its first argument and a newline into it, reads the
;; file back and prints what it read. Exit 2: the file cannot be created;
;; 3: it already existed (another instance's file would be visible);
;; 4: reading it back failed.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get"
    (func $fd_prestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get"
    (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  ;; 0: iovec, 8: count, 16: argc, 20: argv size, 32: prestat, 40: opened fd,
  ;; 64: "kuasar.txt", 80: "\n", 96: "no-arg", 128: messages,
  ;; 1024: argv pointers, 2048: argv strings, 8192: read buffer
  (memory (export "memory") 1)
  (data (i32.const 64) "kuasar.txt")
  (data (i32.const 80) "\n")
  (data (i32.const 96) "no-arg")
  (data (i32.const 128) "cannot create kuasar.txt\n")
  (data (i32.const 160) "kuasar.txt already exists\n")
  (data (i32.const 192) "cannot read kuasar.txt back\n")
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $strlen (param $p i32) (result i32)
    (local $n i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $next)))
    (local.get $n))
  (func $fail (param $msg i32) (param $len i32) (param $code i32)
    (call $write (i32.const 2) (local.get $msg) (local.get $len))
    (call $proc_exit (local.get $code)))
  (func (export "_start")
    (local $dir i32)
    (local $fd i32)
    (local $err i32)
    (local $arg i32)
    (local $len i32)
    (local $n i32)
    ;; the last preopened directory
    (local.set $fd (i32.const 3))
    (local.set $dir (i32.const -1))
    (block $done
      (loop $next
        (br_if $done (call $fd_prestat_get (local.get $fd) (i32.const 32)))
        (local.set $dir (local.get $fd))
        (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
        (br $next)))
    ;; what to write: argv[1], or "no-arg"
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (drop (call $args_get (i32.const 1024) (i32.const 2048)))
    (local.set $arg (i32.const 96))
    (local.set $len (i32.const 6))
    (if (i32.ge_u (i32.load (i32.const 16)) (i32.const 2))
      (then
        (local.set $arg (i32.load (i32.const 1028)))
        (local.set $len (call $strlen (local.get $arg)))))
    ;; create exclusively (oflags CREAT|EXCL), read and write rights
    (local.set $err (call $path_open (local.get $dir) (i32.const 0)
      (i32.const 64) (i32.const 10) (i32.const 5)
      (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 40)))
    (if (i32.eq (local.get $err) (i32.const 20))
      (then (call $fail (i32.const 160) (i32.const 26) (i32.const 3))))
    (if (local.get $err)
      (then (call $fail (i32.const 128) (i32.const 25) (i32.const 2))))
    (local.set $fd (i32.load (i32.const 40)))
    (call $write (local.get $fd) (local.get $arg) (local.get $len))
    (call $write (local.get $fd) (i32.const 80) (i32.const 1))
    (drop (call $fd_close (local.get $fd)))
    ;; open it again (no flags) and print what it holds
    (if (call $path_open (local.get $dir) (i32.const 0)
          (i32.const 64) (i32.const 10) (i32.const 0)
          (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 40))
      (then (call $fail (i32.const 192) (i32.const 28) (i32.const 4))))
    (local.set $fd (i32.load (i32.const 40)))
    (i32.store (i32.const 0) (i32.const 8192))
    (i32.store (i32.const 4) (i32.const 4096))
    (if (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))
      (then (call $fail (i32.const 192) (i32.const 28) (i32.const 4))))
    (local.set $n (i32.load (i32.const 8)))
    (call $write (i32.const 1) (i32.const 8192) (local.get $n))
    (drop (call $fd_close (local.get $fd)))))
