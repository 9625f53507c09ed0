include!("trl_like/build.rs");
