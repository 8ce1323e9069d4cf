from ipybox_server.launcher import main

main()
