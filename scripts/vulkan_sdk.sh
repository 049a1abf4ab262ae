#!/bin/sh
# What `make test-vulkan` needs to build ggml's Vulkan backend and run it on the CPU:
# Mesa's software Vulkan driver (lavapipe), the Vulkan loader, glslc and the
# SPIR-V headers, from the system's packages (Debian and Ubuntu names). The
# pinned llama.cpp needs Vulkan headers that know VK_EXT_layer_settings
# (1.3.261 and later); where the system's are older (Debian 12 ships
# 1.3.239), Debian 13's libvulkan-dev headers are unpacked into
# build/vulkan-sdk, which CMake's FindVulkan is pointed at by VULKAN_SDK.
#
# Prints the VULKAN_SDK to build with (nothing: the system's headers will do).
set -eu

PACKAGES="mesa-vulkan-drivers libvulkan-dev glslc spirv-headers"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "make test-vulkan needs:$missing (sudo apt-get install$missing)" >&2
        exit 1
    fi
    apt-get install -y -q $missing >&2
fi

if grep -q VK_EXT_layer_settings /usr/include/vulkan/vulkan_core.h 2>/dev/null; then
    exit 0
fi
sdk="$(pwd)/build/vulkan-sdk"
if [ ! -f "$sdk/usr/include/vulkan/vulkan_core.h" ]; then
    echo "the system's Vulkan headers predate VK_EXT_layer_settings: fetching Debian 13's libvulkan-dev" >&2
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
        > "$work/sources.list"
    apt_opts="-o Dir::Etc::SourceList=$work/sources.list -o Dir::Etc::SourceParts=/dev/null
              -o Dir::State::Lists=$work/lists -o Dir::Cache=$work/cache -o APT::Sandbox::User=root"
    # shellcheck disable=SC2086
    apt-get $apt_opts update >&2
    # shellcheck disable=SC2086
    (cd "$work" && apt-get $apt_opts download libvulkan-dev >&2)
    rm -rf "$sdk.partial"
    dpkg-deb -x "$work"/libvulkan-dev_*.deb "$sdk.partial"
    rm -rf "$sdk"
    mv "$sdk.partial" "$sdk"
fi
echo "$sdk/usr"
