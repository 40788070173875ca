#!/usr/bin/env bash
# Build fio with the libblkio engine into bench/.cache/ (idempotent).
#
# Debian 12 has no libblkio and its fio lacks the libblkio engine, so:
#   * libblkio1 / libblkio-dev are downloaded from Debian sid (they only need
#     libc >= 2.34) and unpacked with dpkg-deb -x into bench/.cache/blkio-root
#     (nothing is installed system-wide);
#   * fio's upstream source (the orig tarball of sid's fio source package) is
#     built against that folder, with an rpath pointing into it.
# The sid sources live in a private apt config under bench/.cache/apt; the
# system's apt sources, lists and package cache are not touched.
#
# Prints the path of the fio binary on its last line of stdout.
# Environment: FIO_CACHE (default: <repo>/bench/.cache), APT_MIRROR
# (default: http://deb.debian.org/debian), JOBS (default: nproc).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${FIO_CACHE:-$(cd "$here/.." && pwd)/.cache}"
MIRROR="${APT_MIRROR:-http://deb.debian.org/debian}"
JOBS="${JOBS:-$(nproc)}"
ROOT="$CACHE/blkio-root"
LIBDIR="$ROOT/usr/lib/x86_64-linux-gnu"
FIO_LINK="$CACHE/fio"                       # symlink to the built binary

log() { printf '[build-fio] %s\n' "$*" >&2; }

has_engine() {  # $1 = fio binary
    [ -x "$1" ] && "$1" --enghelp 2>/dev/null | grep -qx '[[:space:]]*libblkio'
}

if has_engine "$FIO_LINK"; then
    log "already built"
    readlink -f "$FIO_LINK"
    exit 0
fi

mkdir -p "$CACHE"

# ---- 1. build dependencies from bookworm (the system's normal sources) -----
BUILD_DEPS=(gcc make pkg-config zlib1g-dev libaio-dev xz-utils ca-certificates)
missing=()
for p in "${BUILD_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing build deps: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    # Wait for another apt/dpkg run instead of failing or breaking its lock.
    $SUDO apt-get -o DPkg::Lock::Timeout=1800 update -q >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=1800 \
        install -y -q "${missing[@]}" >&2
fi

# ---- 2. private apt config pointing at sid ---------------------------------
APTDIR="$CACHE/apt"
mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial"
cat >"$APTDIR/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main
EOF
APT_OPTS=(
    -o "Dir::Etc::sourcelist=$APTDIR/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$APTDIR/lists"
    -o "Dir::Cache=$APTDIR/cache"
    -o "APT::Get::List-Cleanup=0"
    -o "APT::Sandbox::User=root"
)
apt_sid() { apt-get "${APT_OPTS[@]}" "$@"; }
apt_cache_sid() { apt-cache "${APT_OPTS[@]}" "$@"; }

if ! ls "$APTDIR/lists/"*sid*Sources* >/dev/null 2>&1 \
        || ! ls "$APTDIR/lists/"*sid*Packages* >/dev/null 2>&1; then
    log "apt-get update (sid, private lists in $APTDIR)"
    apt_sid update -q >&2
fi

# ---- 3. libblkio from sid, unpacked into ROOT ------------------------------
if [ ! -e "$LIBDIR/pkgconfig/blkio.pc" ]; then
    mkdir -p "$CACHE/debs"
    (cd "$CACHE/debs" && ls libblkio1_*.deb libblkio-dev_*.deb >/dev/null 2>&1) || {
        log "downloading libblkio1 libblkio-dev from sid"
        (cd "$CACHE/debs" && apt_sid download libblkio1 libblkio-dev >&2)
    }
    rm -rf "$ROOT.tmp"
    mkdir -p "$ROOT.tmp"
    for deb in "$CACHE"/debs/libblkio1_*.deb "$CACHE"/debs/libblkio-dev_*.deb; do
        log "unpacking $(basename "$deb")"
        dpkg-deb -x "$deb" "$ROOT.tmp"
    done
    rm -rf "$ROOT"
    mv "$ROOT.tmp" "$ROOT"
fi
[ -e "$LIBDIR/pkgconfig/blkio.pc" ] || { log "blkio.pc missing in $ROOT"; exit 1; }

# ---- 4. fio source (orig tarball) from sid ---------------------------------
SRCDL="$CACHE/fio-dl"
mkdir -p "$SRCDL"
if ! ls "$SRCDL"/fio_*.orig.tar.* >/dev/null 2>&1; then
    log "downloading fio source from sid"
    # Only the orig tarball is needed; some mirrors/proxies serve it but 404
    # the .dsc/.debian.tar/.asc, which makes apt-get exit non-zero. Tolerate
    # that and check the tarball's sha256 against the signed Sources index.
    (cd "$SRCDL" && apt_sid source --download-only fio >&2) \
        || log "apt-get source reported errors; continuing if the orig tarball arrived"
fi
orig="$(ls "$SRCDL"/fio_*.orig.tar.* 2>/dev/null | grep -v '\.asc$' | sort -V | tail -n1 || true)"
[ -n "$orig" ] || { log "no fio orig tarball in $SRCDL"; exit 1; }
want="$(apt_cache_sid showsrc fio 2>/dev/null \
    | awk -v f="$(basename "$orig")" '/^Checksums-Sha256:/{c=1;next} /^[^ ]/{c=0} c && $3==f {print $1; exit}' || true)"
have="$(sha256sum "$orig" | cut -d' ' -f1)"
if [ -n "$want" ] && [ "$want" != "$have" ]; then
    log "sha256 mismatch for $orig (want $want, have $have); deleting it"
    rm -f "$orig"
    exit 1
fi
if [ -n "$want" ]; then
    log "$(basename "$orig"): sha256 ok"
else
    log "warning: could not find $(basename "$orig") in the Sources index; sha256 not checked"
fi
ver="$(basename "$orig" | sed -E 's/^fio_(.*)\.orig\.tar\..*$/\1/')"
SRC="$CACHE/fio-$ver"
# The rpath is absolute: rebuild from scratch if the cache moved.
if [ -e "$SRC/.blkio-libdir" ] && [ "$(cat "$SRC/.blkio-libdir")" != "$LIBDIR" ]; then
    log "cache moved since the last build; rebuilding"
    rm -rf "$SRC"
fi
if [ ! -e "$SRC/configure" ]; then
    log "extracting $(basename "$orig")"
    rm -rf "$SRC" "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xf "$orig" -C "$SRC.tmp" --strip-components=1
    mv "$SRC.tmp" "$SRC"
fi

# ---- 5. configure + build --------------------------------------------------
LDF="-L$LIBDIR -Wl,-rpath,$LIBDIR"
cd "$SRC"
if [ ! -e config-host.mak ] || ! grep -q '^CONFIG_LIBBLKIO=y' config-host.mak; then
    log "configure fio $ver"
    PKG_CONFIG_PATH="$LIBDIR/pkgconfig" PKG_CONFIG_SYSROOT_DIR="$ROOT" LDFLAGS="$LDF" \
        ./configure --extra-cflags="-I$ROOT/usr/include" >"$CACHE/fio-configure.log" 2>&1 \
        || { cat "$CACHE/fio-configure.log" >&2; exit 1; }
    echo "$LIBDIR" >.blkio-libdir
    grep -E '^libblkio engine' "$CACHE/fio-configure.log" >&2 || true
    grep -q '^CONFIG_LIBBLKIO=y' config-host.mak \
        || { log "configure did not enable the libblkio engine"; exit 1; }
fi
log "make -j$JOBS"
make -j"$JOBS" LDFLAGS="$LDF" >"$CACHE/fio-make.log" 2>&1 \
    || { tail -n 40 "$CACHE/fio-make.log" >&2; exit 1; }

has_engine "$SRC/fio" || { log "built fio has no libblkio engine"; exit 1; }
ln -sfn "$SRC/fio" "$FIO_LINK"
log "built $("$SRC/fio" --version)"
readlink -f "$FIO_LINK"
