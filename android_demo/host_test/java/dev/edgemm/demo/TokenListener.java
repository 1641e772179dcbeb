package dev.edgemm.demo;

/** Host twin of the Kotlin `fun interface TokenListener` (EdgemmNative.kt). */
public interface TokenListener {
    boolean onToken(String piece, int tokenId);
}
