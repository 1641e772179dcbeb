// edgemm Android demo: one app module whose native part (CMake) builds ../native (the engine's C ABI
// library, libedgemm.so) and the JNI bridge (app/src/main/cpp/edgemm_jni.cpp). See docs/apps.md.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "edgemm-demo"
include(":app")
