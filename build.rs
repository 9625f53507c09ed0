include!("trl_like/link.rs");

fn main() {
    link_libtorch();
}
