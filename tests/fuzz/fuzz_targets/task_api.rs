#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kuasar_fuzz::task_api::run(data));
