"""What runs QEMU guests for the tests, the benchmarks and the demo — not part of the
installed package: throw-away guests from the host's kernel and a busybox initramfs
(`guest`), the kernel as QEMU loads it fastest under TCG (`kernel`), the appliance VM under
the sid chroot's QEMU (`appliance`) and the README's demo (`demo`, run by scripts/demo)."""
